"""Registry of pretraining objectives; `config.objective` names one.

An objective brings its own config section (`section`, `default_config`, `validate`), so adding one is a new
module plus one line here: no shared config file changes.
"""
from mae_jax.objectives.gan_mae import GANMAE
from mae_jax.objectives.mae import MAE
from mae_jax.objectives.mage import MAGE
from mae_jax.objectives.mr_mae import MRGANMAE, MRMAE
from mae_jax.objectives.vqgan import VQGANTokenizer

OBJECTIVES = {
    'mae': MAE,
    'gan_mae': GANMAE,
    'mage': MAGE,
    'mr_mae': MRMAE,
    'mr_gan_mae': MRGANMAE,
    'vqgan': VQGANTokenizer,
}


def register(name, objective_class):
  """Adds an objective (e.g. one defined outside the package); its section joins configs made after this."""
  OBJECTIVES[name] = objective_class


def config_sections():
  """{section name: default ConfigDict} of every registered objective (an objective may read its parent's)."""
  return {cls.section: cls.default_config() for cls in OBJECTIVES.values() if cls.section}


def create(config):
  if config.objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {config.objective!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[config.objective](config)
