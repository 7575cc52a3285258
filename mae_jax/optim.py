"""The reference's pretraining optimizer: AdamW, lr = blr * batch / 256, per-step warmup + half-cycle cosine.

Weight decay follows timm's `add_weight_decay` as used by MAE: every parameter with 2 or more dimensions
decays (kernels, and also the cls and mask tokens); biases and LayerNorm parameters do not. Frozen
parameters (as the objective declares them) get no update at all.
"""
import jax
import jax.numpy as jnp
import optax

from mae_jax.objectives.base import PhaseTrainable


def peak_learning_rate(train_config):
  return train_config.blr * train_config.batch_size / 256


def learning_rate_schedule(train_config, steps_per_epoch, total_steps):
  """lr(step), evaluated per step on fractional epochs like `util/lr_sched.adjust_learning_rate`."""
  peak, floor = peak_learning_rate(train_config), train_config.min_lr
  warmup = min(train_config.warmup_epochs * steps_per_epoch, 0.5 * total_steps)  # short smoke runs still decay

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1e-9)
    progress = (step - warmup) / max(total_steps - warmup, 1e-9)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create(train_config, schedule, trainable):
  """AdamW over the trainable leaves (`trainable`: pytree of bools like params); frozen leaves stay put.

  With a `PhaseTrainable` (an objective with several update phases, see `Objective.update_phases`): one
  such optimizer per phase, each with its own moments and count, run by `tx.update(..., phase=name)`.
  """
  if isinstance(trainable, PhaseTrainable):
    return per_phase({name: create(train_config, schedule, mask) for name, mask in trainable.items()})
  adamw = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2, eps=1e-8,
                      weight_decay=train_config.weight_decay, mask=decay_mask)
  if train_config.get('grad_clip', 0.0) > 0:  # global norm over the trainable gradients, before AdamW
    adamw = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()}, labels)


def per_phase(optimizers):
  """Combines {phase name: optimizer}: the state is {phase name: state}; `update(..., phase=name)` runs that
  phase's optimizer and leaves the other phases' states as they are."""

  def init(params):
    return {name: tx.init(params) for name, tx in optimizers.items()}

  def update(updates, state, params=None, *, phase, **extra_args):
    del extra_args
    if phase not in optimizers:
      raise KeyError(f'no optimizer for update phase {phase!r}; the objective declared {sorted(optimizers)}')
    updates, phase_state = optimizers[phase].update(updates, state[phase], params)
    return updates, {**state, phase: phase_state}

  return optax.GradientTransformationExtraArgs(init, update)
