"""The reference's pretraining optimizer: AdamW, lr = blr * batch / 256, per-step warmup + half-cycle cosine.

Weight decay follows timm's `add_weight_decay` as used by MAE: every parameter with 2 or more dimensions
decays (kernels, and also the cls and mask tokens); biases and LayerNorm parameters do not. Frozen
parameters (as the objective declares them) get no update at all.
"""
import jax
import jax.numpy as jnp
import optax


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
  """AdamW over the trainable leaves (`trainable`: pytree of bools like params); frozen leaves stay put."""
  adamw = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2, eps=1e-8,
                      weight_decay=train_config.weight_decay, mask=decay_mask)
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()}, labels)
