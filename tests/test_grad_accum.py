"""Gradient accumulation and gradient clipping.

k micro-batches give the same update as one batch k times larger: the per-example PRNG keys make the masks
of each image independent of how the batch is split, and MAE's loss averages over equal mask counts.
"""
import jax
import ml_collections
import numpy as np
import optax
import pytest

from mae_jax import config as config_lib
from mae_jax import optim, sharding, train

ACCUM = 4


def tiny_config(grad_accum_steps):
  from configs import mae_tiny_cpu
  c = mae_tiny_cpu.get_config()
  c.model.variant = 'pico/4'  # 2 blocks: compiles faster
  c.train.update(grad_accum_steps=grad_accum_steps, num_steps=3, warmup_epochs=0)  # lr > 0 from the first step
  c.data.eval_split = ''
  c.mesh.update(data=1, fsdp=1)
  return c


def one_step(config, initial_state=None):
  """(state, metrics) after one step from `initial_state` (default: the config's initial state)."""
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  batch = sharding.global_batch(trainer.loader.local_batch(0), trainer.mesh)
  state = trainer.init_state() if initial_state is None else jax.device_put(initial_state, trainer.state_sharding)
  state, metrics = trainer.train_step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


def max_abs(tree):
  return max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tree) if np.size(x))


@pytest.mark.slow
def test_accumulated_micro_batches_match_one_big_batch():
  initial = jax.device_get(train.Trainer(tiny_config(1), devices=jax.devices()[:1]).init_state())
  whole, whole_metrics = one_step(tiny_config(1), initial)
  accum, accum_metrics = one_step(tiny_config(ACCUM), initial)
  assert int(whole['step']) == int(accum['step']) == 1
  np.testing.assert_allclose(accum_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  np.testing.assert_allclose(accum_metrics['grad_norm'], whole_metrics['grad_norm'], rtol=1e-5)
  # AdamW's first moment after one step is 0.1 * gradient: the accumulated gradient, leaf by leaf.
  mu = lambda state: [s.mu for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda x: hasattr(x, 'mu'))
                      if hasattr(s, 'mu')][0]
  assert max_abs(jax.tree.map(lambda a, b: a - b, mu(accum), mu(whole))) <= 1e-5 * max_abs(mu(whole))
  # And the parameters moved the same way. AdamW's first step is lr * g / (|g| + 1e-8): it magnifies the
  # rounding noise of gradients that are mathematically zero (the attention's key bias: softmax ignores it,
  # |g| ~ 1e-11), so those entries agree only to a fraction of lr; every other entry to 1e-6.
  lr = optim.peak_learning_rate(tiny_config(1).train)
  for new, ref, grad in zip(jax.tree.leaves(accum['params']), jax.tree.leaves(whole['params']),
                            jax.tree.leaves(mu(whole))):
    diff, resolved = np.abs(new - ref), np.abs(10 * grad) > 1e-8
    assert np.all(diff[resolved] < 1e-6) and np.all(diff < 0.05 * lr), float(diff.max())


def test_batch_must_split_into_micro_batches():
  config = tiny_config(3)  # 64 images do not split into 3 micro-batches
  with pytest.raises(config_lib.ConfigError, match='grad_accum_steps=3'):
    train.Trainer(config, devices=jax.devices()[:1])


def test_grad_clip_scales_the_global_norm_before_adamw():
  params = {'w': np.ones((4, 3), np.float32), 'b': np.zeros((3,), np.float32)}
  grads = [{'w': np.full((4, 3), 10.0, np.float32), 'b': np.full((3,), -20.0, np.float32)},
           {'w': np.full((4, 3), 0.01, np.float32), 'b': np.full((3,), 0.02, np.float32)}]
  trainable = {'w': True, 'b': True}

  def updates(clip, gradients):
    config = ml_collections.ConfigDict(dict(train=dict(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=clip),
                                            optim=optim.default_config()))
    tx = optim.create(config, lambda step: 1e-3, trainable)
    state, out = tx.init(params), []
    for g in gradients:
      u, state = tx.update(g, state, params)
      out.append(u)
    return out

  clip = 1.0
  norm = float(optax.tree.norm(grads[0]))
  clipped = updates(clip, grads)
  # Clipping is the same as feeding AdamW the rescaled gradient (the second is under the threshold) ...
  manual = updates(0.0, [jax.tree.map(lambda g: g * clip / norm, grads[0]), grads[1]])
  for got, want in zip(clipped, manual):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), got, want)
  # ... and it changes the second update, since AdamW's moments saw the smaller first gradient.
  unclipped = updates(0.0, grads)
  assert not np.allclose(unclipped[1]['w'], clipped[1]['w'], rtol=1e-3)


def test_grad_clip_off_keeps_the_optimizer_state_layout():
  """Checkpoints of runs without clipping stay restorable: grad_clip=0 adds no optimizer state."""
  params = {'w': np.ones((2, 2), np.float32)}
  config = lambda **train: ml_collections.ConfigDict(dict(train=dict(b1=0.9, b2=0.95, weight_decay=0.05, **train),
                                                          optim=optim.default_config()))
  make = lambda clip: optim.create(config(grad_clip=clip), lambda step: 1e-3, {'w': True}).init(params)
  base = optim.create(config(), lambda step: 1e-3, {'w': True}).init(params)
  assert jax.tree.structure(make(0.0)) == jax.tree.structure(base)
