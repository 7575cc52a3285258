"""A test objective with a frozen network: MAE plus mimicking a frozen teacher ViT at the visible patches.

It has MR-MAE's shape (a teacher outside the train state, targets gathered at the kept ids) on a tiny
teacher that the tests write to a file, and is registered like any objective, with its own config section:
nothing in the package knows about it. `InStateMimicMAE` is the same computation with the teacher's params
held in the train state instead (trained at a zero learning rate), the reference the tests compare with.
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax import frozen, objectives
from mae_jax.models import masking, vit
from mae_jax.models.patchify import patchify
from mae_jax.objectives.mae import MAE, reconstruction_loss


def teacher_module(img_size, width=32):
  return vit.ViT(img_size=img_size, patch_size=4, width=width, depth=2, num_heads=2)


def write_teacher(path, img_size, seed=7, width=32):
  """A teacher's params file, in the format `python -m mae_jax.export import` writes (flax msgpack)."""
  model = teacher_module(img_size, width)
  params = model.init(jax.random.key(seed), jnp.zeros((1, img_size, img_size, 3)))['params']
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
  return jax.tree.map(np.asarray, params)


class MimicMAE(MAE):
  section = 'mimic_mae'

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(teacher='', weight=1.0))

  def __init__(self, config):
    super().__init__(config)
    self.teacher = teacher_module(self.img_size)
    self.mimic_head = nn.Dense(self.teacher.width, name='mimic_head')

  def teacher_network(self):
    expected = lambda: jax.eval_shape(self.teacher.init, jax.random.key(0), self.dummy_images())['params']
    return frozen.FrozenNetwork('mimic_mae.teacher', expected)

  def frozen_networks(self):
    return {'teacher': self.teacher_network()}

  def init(self, rng):
    head = self.mimic_head.init(jax.random.fold_in(rng, 2), jnp.zeros((1, 1, self.encoder.width)))['params']
    return {**super().init(rng), 'mimic_head': head}

  def loss_fn(self, params, batch, rng, train=True):
    images = batch['image']
    m = self.random_masking(self.sample_noise(batch['example_key']))
    latent = self.encoder.apply({'params': params['encoder']}, images, m.ids_keep)['tokens']
    pred = self.decoder.apply({'params': params['decoder']}, latent, m.ids_restore)
    rec = reconstruction_loss(pred, patchify(images, self.patch_size), m.mask, self.norm_pix_loss)
    teacher_tokens = self.teacher.apply({'params': params['teacher']}, images)['tokens'][:, 1:]
    target = masking.gather(teacher_tokens, m.ids_keep)
    mimic = jnp.mean((self.mimic_head.apply({'params': params['mimic_head']}, latent[:, 1:]) - target) ** 2)
    return rec + self.config.mimic_mae.weight * mimic, {'loss/reconstruction': rec, 'loss/mimic': mimic}


class InStateMimicMAE(MimicMAE):
  """The teacher's params in the train state (config.optim.lr_mults gives them a zero learning rate)."""

  def frozen_networks(self):
    return {}

  def init(self, rng):
    teacher = frozen.read(self.teacher_network(), self.config)
    return {**super().init(rng), 'teacher': jax.tree.map(jnp.asarray, teacher)}


def register():
  objectives.register('mimic_mae', MimicMAE)
  objectives.register('mimic_mae_in_state', InStateMimicMAE)


def unregister():
  for name in ('mimic_mae', 'mimic_mae_in_state'):
    objectives.OBJECTIVES.pop(name, None)
