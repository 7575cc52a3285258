"""The one seam between the training loop and the pretraining objectives.

An objective owns its Flax modules and exposes pure functions of a params pytree. The loop only calls
these methods, so adding an objective never touches `train.py`.
"""
import abc
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mae_jax.optim import PhaseTrainable  # noqa: F401  (re-exported: objectives return it)


class UpdatePhase(NamedTuple):
  """One optimizer update of the train step: the gradient of `loss_fn` (same signature as
  `Objective.loss_fn`) moves the leaves that phase `name` owns (see `Objective.update_phases`)."""
  name: str
  loss_fn: Callable


class Objective(abc.ABC):
  """Base class of MAE, GAN-MAE, MAGE and MR-MAE.

  Subclasses set `self.encoder` (a `vit.ViT`) and implement `init` and `loss_fn`. An objective's own config
  section (`config.<section>`) is defined and validated here, next to it: `default_config` and `validate`.
  """
  section = None  # the name of its config section, or None
  image_columns = ()  # the panels of `visualize`, left to right, as TensorBoard shows them

  def __init__(self, config):
    self.config = config
    self.img_size = config.data.img_size

  @staticmethod
  def default_config():
    """The defaults of `config.<section>` (an ml_collections.ConfigDict), or None without a section."""
    return None

  @classmethod
  def validate(cls, config):
    """Raises `mae_jax.config.ConfigError` naming the field for a value of its section that cannot work."""

  def frozen_networks(self):
    """{name: `frozen.FrozenNetwork`}: networks used but never trained (a tokenizer, a teacher). Each is
    loaded once from the file its config field names and reaches `loss_fn` as `params[name]`, outside the
    train state: not differentiated, not in the optimizer state, not checkpointed."""
    return {}

  def frozen_forwards(self):
    """{name: fn(params with the frozen networks, images)}: the pass a step makes through each frozen network
    (a teacher's forward), for `mae_jax.bench` to cost on its own; {} (the default): none reported."""
    return {}

  def init_collections(self, rng):
    """Mutable collections ({'batch_stats': ...} of BatchNorm layers) kept in the train state and its
    checkpoints; {} (the default) for none. Objectives with some override `loss_with_collections`."""
    del rng
    return {}

  def warm_start_source(self, params, source_config):
    """The params of `config.init_from` to merge into a fresh init (by name and shape); `source_config`: the
    source run's config, or None for an imported file. Downstream models check and adapt them here."""
    del source_config
    return params

  def loss_with_collections(self, params, collections, batch, rng, train=True):
    """(loss, metrics, updated collections): the loop's entry point for a single-phase objective."""
    loss, metrics = self.loss_fn(params, batch, rng, train)
    return loss, metrics, collections

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
    """A pytree of bools like `params`: False leaves are frozen (teachers, tokenizers).

    An objective with several update phases returns a `PhaseTrainable` instead: one such pytree per phase.
    """
    return jax.tree.map(lambda _: True, params)

  def update_phases(self):
    """The optimizer updates one train step makes, in order: a tuple of `UpdatePhase`.

    Default: one phase, `loss_fn` over every trainable leaf, with one optimizer; `grad_accum_steps`
    averages its gradients over micro-batches. That is the plain case and the loop's behaviour for it is
    unchanged. An objective that needs separate players (GAN-MAE's generator then discriminator update)
    returns several phases and a `PhaseTrainable` from `trainable` with one entry per phase name. The
    step then runs, per phase in order: the gradients of its `loss_fn` at the params left by the previous
    phases (averaged over micro-batches as well), then that phase's own optimizer update, which moves only
    that phase's leaves. Every phase sees the same batch and example keys, so the same masks. Each phase
    gets a dropout key folded with its index. The phases' metrics are merged, with a later phase winning a
    name clash. 'loss' is the sum of the phases' losses, and 'loss/phase_<name>' and
    'grad_norm/<name>' are added per phase. The loop never needs to know which objective it runs.
    """
    return (UpdatePhase('train', self.loss_fn),)

  def num_fixed_params(self):
    """Entries of the fixed sin-cos tables, which the reference counts as (frozen) parameters."""
    if self.encoder.posemb != 'sincos':  # a learned table is a param, counted with the others
      return 0
    return (self.encoder.num_prefix_tokens + self.encoder.num_patches) * self.encoder.width

  def features(self, params, images):
    """(N, D) global-average-pooled encoder features of the unmasked images, for kNN evaluation."""
    tokens = self.encoder.apply({'params': params['encoder']}, images)['tokens']
    return tokens[:, self.encoder.num_prefix_tokens:].mean(axis=1)

  def visualize(self, params, images, rng):
    """Optional: dict of image batches (same layout as `images`) to show in TensorBoard, or None."""
    return None

  def dummy_images(self, batch_size=1):
    return jnp.zeros((batch_size, self.img_size, self.img_size, 3), jnp.float32)
