"""MAE configs, objective and one real ViT-B train step, checked against AdamW by hand."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from mae_jax import config as config_lib
from mae_jax import objectives, optim, sharding, train


def param_count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# Totals of the reference's models (facebookresearch/mae), fixed sin-cos tables included; and trainable ones.
@pytest.mark.parametrize('name,total,trainable', [
    ('mae_vitb', 111_907_840, 111_655_680),
    ('mae_vitl', 329_541_888, 329_239_296),
    ('mae_vith', 657_074_508, 656_613_964),
])
def test_paper_configs_build_with_the_reference_parameter_counts(name, total, trainable):
  config = load_config(name)
  config_lib.validate(config)
  objective = objectives.create(config)
  params = jax.eval_shape(objective.init, jax.random.key(0))
  assert param_count(params) == trainable
  assert param_count(params) + objective.num_fixed_params() == total


def test_vitb_shapes_match_the_reference_state_dict():
  objective = objectives.create(load_config('mae_vitb'))
  params = jax.eval_shape(objective.init, jax.random.key(0))
  enc, dec = params['encoder'], params['decoder']
  assert enc['patch_embed']['proj']['kernel'].shape == (16, 16, 3, 768)  # torch (768, 3, 16, 16)
  assert enc['blocks_11']['attn']['qkv']['kernel'].shape == (768, 2304)  # torch (2304, 768)
  assert enc['blocks_11']['mlp']['fc1']['kernel'].shape == (768, 3072)
  assert dec['decoder_embed']['kernel'].shape == (768, 512)
  assert dec['decoder_blocks_7']['attn']['qkv']['kernel'].shape == (512, 1536)
  assert dec['decoder_pred']['kernel'].shape == (512, 768)
  assert dec['mask_token'].shape == (1, 1, 512) and enc['cls_token'].shape == (1, 1, 768)
  assert 'blocks_12' not in enc and 'decoder_blocks_8' not in dec


def with_counts(opt_state, count):
  """`opt_state` with every optimizer step counter (Adam's, the schedule's) set to `count`."""
  def replace(path, leaf):
    named = getattr(path[-1], 'name', None) if path else None
    return jnp.full_like(leaf, count) if named == 'count' else leaf
  return jax.tree_util.tree_map_with_path(replace, opt_state)


@pytest.mark.slow
def test_vitb_train_step_past_warm_up_moves_every_param_as_adamw_says():
  config = load_config('mae_vitb')
  # 4 steps: the warm-up is min(40 epochs, half the run) = 2 steps. A big lr, so that the decay term
  # (wd * lr * p) is far above float32 rounding of the params.
  config.train.update(batch_size=2, num_steps=4, blr=0.64)
  config.data.update(source='embedded', name='digits', eval_split='test')  # offline stand-in for ImageNet
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  t, step = config.train, 3
  peak = t.blr * t.batch_size / 256
  lr = float(trainer.schedule(step))  # half way down the cosine of steps 2..4
  np.testing.assert_allclose(lr, t.min_lr + (peak - t.min_lr) * 0.5, rtol=1e-6)
  # The state of a run resumed at step 3 whose moments are still zero: every step counter says 3.
  state = trainer.init_state()
  state = {**state, 'step': jnp.full_like(state['step'], step), 'opt_state': with_counts(state['opt_state'], step)}
  batch = sharding.global_batch(trainer.loader.local_batch(step), trainer.mesh)
  assert batch['image'].shape == (2, 224, 224, 3)

  # The step's gradient, with the step's random draws (train.make_train_step: the key of the step, then
  # one key per example, then the task's batch hook).
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
  example_rng, rng = jax.random.split(rng)
  keyed = trainer.task.batch_hook(train.with_example_keys(batch, example_rng), jax.random.fold_in(example_rng, 1))
  phase = trainer.objective.update_phases()[0]
  (loss, _), grads = jax.jit(train.phase_grad_fn(trainer.objective, phase))(state['params'], {}, {}, keyed, rng)
  before, grads = jax.device_get((state['params'], grads))
  before = jax.tree.map(np.array, before)  # copies: the step donates the state's buffers

  state, metrics = trainer.train_step(state, batch)
  assert int(state['step']) == step + 1
  np.testing.assert_allclose(float(metrics['loss']), float(loss), rtol=1e-5)  # the same masks
  assert 0.1 < float(metrics['loss']) < 10 and float(metrics['grad_norm']) > 0
  np.testing.assert_allclose(float(metrics['lr']), lr, rtol=1e-6)

  # AdamW (torch.optim.AdamW, optax.adamw) from zero moments at its 4th step: m = (1 - b1) g,
  # v = (1 - b2) g^2, bias-corrected by 1 - b^4; weight decay on every param with ndim > 1 (the
  # reference's rule: not on biases and norms, but on the cls and mask tokens).
  after, n = jax.device_get(state['params']), step + 1
  decayed = []
  def check(path, p, g, new):
    p, g = p.astype(np.float64), g.astype(np.float64)
    m_hat = (1 - t.b1) * g / (1 - t.b1**n)
    v_hat = (1 - t.b2) * g**2 / (1 - t.b2**n)
    decay = t.weight_decay if p.ndim > 1 else 0.0
    expected = -lr * (m_hat / (np.sqrt(v_hat) + config.optim.eps) + decay * p)
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    moved = np.asarray(new, np.float64) - p
    # rtol 1e-5, plus the rounding of the float32 sum p + update (at most half a spacing of the new value).
    off = np.abs(moved - expected) > 1e-5 * np.abs(expected) + np.spacing(np.abs(new)) + 1e-9
    assert not off.any(), (f'{name}: {off.sum()} of {off.size} moved otherwise, e.g. {moved[off][:3]} instead '
                           f'of {expected[off][:3]}')
    if decay:
      decayed.append(name)
  jax.tree_util.tree_map_with_path(check, before, grads, after)
  assert {'encoder/blocks_0/attn/qkv/kernel', 'encoder/cls_token', 'decoder/mask_token'} <= set(decayed)
  assert 'encoder/blocks_0/attn/qkv/bias' not in decayed and 'encoder/norm/scale' not in decayed


def test_loss_is_the_mean_over_masked_patches():
  config = load_config('mae_tiny_cpu')
  objective = objectives.create(config)
  params = objective.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), 2))
  loss, _ = objective.loss_fn(params, {'image': images, 'example_key': keys}, jax.random.key(3), train=False)
  pred, mask = objective.forward(params, images, objective.sample_noise(keys))
  assert float(mask.sum()) == 2 * (64 - 16)  # 75% of 64 patches masked per image
  target = np.asarray(images).reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, 48)
  per_patch = ((np.asarray(pred) - target) ** 2).mean(-1)
  np.testing.assert_allclose(float(loss), (per_patch * np.asarray(mask)).sum() / np.asarray(mask).sum(), rtol=1e-5)


def test_learning_rate_follows_the_reference_schedule():
  t = config_lib.base_config().train
  t.update(batch_size=512, blr=1e-3, warmup_epochs=2, epochs=10, min_lr=1e-6)
  steps_per_epoch = 7
  schedule = optim.learning_rate_schedule(t, steps_per_epoch, 10 * steps_per_epoch)
  peak = 1e-3 * 512 / 256
  for step in [0, 3, 13, 14, 30, 69]:
    epoch = step / steps_per_epoch  # util/lr_sched.adjust_learning_rate on fractional epochs
    if epoch < 2:
      expected = peak * epoch / 2
    else:
      expected = 1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * (epoch - 2) / (10 - 2)))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_weight_decay_skips_1d_params_but_not_tokens():
  config = load_config('mae_tiny_cpu')
  _, wd = optim.param_multipliers(config, jax.eval_shape(objectives.create(config).init, jax.random.key(0)))
  assert wd['encoder']['cls_token'] == wd['decoder']['mask_token'] == 1  # 3-D: decayed, as in the reference
  assert wd['encoder']['blocks_0']['attn']['qkv']['kernel'] == 1
  assert wd['encoder']['blocks_0']['attn']['qkv']['bias'] == 0
  assert wd['encoder']['norm']['scale'] == 0


@pytest.mark.parametrize('field,value,message', [
    ('mae.mask_ratio', 1.5, 'mask_ratio'),
    ('model.variant', 'Q/16', 'unknown ViT variant'),
    ('data.img_size', 30, 'multiple of the patch size'),
    ('model.dtype', 'float16', 'dtype'),
    ('train.batch_size', 0, 'batch_size'),
    ('objective', 'nope', 'objective'),
    ('data.source', 'web', 'source'),
    ('mesh.fsdp', 0, 'mesh.fsdp'),
])
def test_validate_names_the_bad_field(field, value, message):
  config = load_config('mae_tiny_cpu')
  section, _, key = field.rpartition('.')
  (config[section] if section else config)[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_impossible_mesh_is_one_clear_error():
  config = load_config('mae_tiny_cpu')
  config.mesh.update(data=3, fsdp=1)
  with pytest.raises(sharding.MeshError, match='needs 3 devices'):
    train.Trainer(config, devices=jax.devices()[:1])
