"""MAE configs, objective and one real ViT-B train step."""
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from mae_jax import config as config_lib
from mae_jax import objectives, optim, sharding, train

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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


def test_vitb_runs_one_real_train_step_at_batch_2():
  config = load_config('mae_vitb')
  config.train.update(batch_size=2, num_steps=1)
  config.data.update(source='embedded', name='digits', eval_split='test')  # offline stand-in for ImageNet
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = np.asarray(state['params']['encoder']['blocks_0']['attn']['qkv']['kernel'])
  batch = sharding.global_batch(trainer.loader.local_batch(0), trainer.mesh)
  assert batch['image'].shape == (2, 224, 224, 3)
  state, metrics = trainer.train_step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and 0.1 < float(metrics['loss']) < 10
  assert int(state['step']) == 1
  # The first step is at lr 0 (warm-up starts at zero, as in the reference), so check the grad norm instead.
  assert float(metrics['lr']) == 0.0 and float(metrics['grad_norm']) > 0
  np.testing.assert_array_equal(np.asarray(state['params']['encoder']['blocks_0']['attn']['qkv']['kernel']), before)


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
