"""The one seam between the training loop and the pretraining objectives.

An objective owns its Flax modules and exposes pure functions of a params pytree. The loop only calls
these methods, so adding an objective never touches `train.py`.
"""
import abc

import jax
import jax.numpy as jnp


class Objective(abc.ABC):
  """Base class of MAE, GAN-MAE, MAGE and MR-MAE.

  Subclasses set `self.encoder` (a `ViTEncoder`) and implement `init` and `loss_fn`.
  """

  def __init__(self, config):
    self.config = config
    self.img_size = config.data.img_size

  @abc.abstractmethod
  def init(self, rng):
    """Returns the params pytree, a dict keyed by module name ('encoder', 'decoder', ...)."""

  @abc.abstractmethod
  def loss_fn(self, params, batch, rng, train=True):
    """Returns (scalar loss, dict of scalar metrics); jit-safe. The loss is a sum of named terms.

    `batch` holds 'image' (N, H, W, 3), 'label' (N,) and 'example_key' (N, 2) raw PRNG key data: draw
    per-example randomness (masks) from 'example_key' so it does not depend on how the batch is split;
    `rng` is for the rest (dropout).
    """

  def trainable(self, params):
    """A pytree of bools like `params`: False leaves are frozen (teachers, tokenizers)."""
    return jax.tree.map(lambda _: True, params)

  def num_fixed_params(self):
    """Entries of the fixed sin-cos tables, which the reference counts as (frozen) parameters."""
    return (self.encoder.num_patches + 1) * self.encoder.width

  def features(self, params, images):
    """(N, D) global-average-pooled encoder features of the unmasked images, for kNN evaluation."""
    tokens, _, _ = self.encoder.apply({'params': params['encoder']}, images)
    return tokens[:, 1:].mean(axis=1)

  def visualize(self, params, images, rng):
    """Optional: dict of image batches (same layout as `images`) to show in TensorBoard, or None."""
    return None

  def dummy_images(self, batch_size=1):
    return jnp.zeros((batch_size, self.img_size, self.img_size, 3), jnp.float32)
