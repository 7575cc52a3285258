"""Registry of pretraining objectives; `config.objective` names one."""
from mae_jax.objectives.gan_mae import GANMAE
from mae_jax.objectives.mae import MAE

OBJECTIVES = {
    'mae': MAE,
    'gan_mae': GANMAE,
}


def create(config):
  if config.objective not in OBJECTIVES:
    raise ValueError(f'unknown objective {config.objective!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[config.objective](config)
