"""Fine-tuning and linear probing: the classifier against timm, the released fine-tuned layout, the tasks end to
end on the embedded digits (pretrained beats random init), warm-start errors, and an exact resume."""
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_main, start_main

from mae_jax import checkpoint, sharding, tasks, train
from mae_jax import config as config_lib
from mae_jax.export import torch_export, torch_import

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def classifier_config(load_config, task='finetune'):
  c = load_config(f'{task}_mae_tiny_cpu')
  c.model.variant = 'pico/4'
  c.train.update(batch_size=16, num_steps=3)
  return c


def timm_classifier(pool, num_classes=10):
  from timm.models.vision_transformer import VisionTransformer
  return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=num_classes,
                           global_pool='avg' if pool == 'gap' else 'token', fc_norm=pool == 'gap').eval()


def timm_logits(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize('pool,fmt', [('gap', 'timm-vit-avg'), pytest.param('cls', 'timm-vit', marks=pytest.mark.slow),
                                      ('gap', 'mae-finetuned')])
def test_a_fine_tuned_classifier_exports_to_timm_with_the_same_logits(load_config, pool, fmt):
  config = classifier_config(load_config)
  config.finetune.pool = pool
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state()
  for step in range(3):  # a few real steps, so the head and the learned table are not at their init
    state, _ = trainer.train_step(state, sharding.global_batch(trainer.loader.local_batch(step), trainer.mesh))
  params = jax.device_get(state['params'])
  assert 'pos_embed' in params['encoder'] and ('fc_norm' in params['encoder']) == (pool == 'gap')
  state_dict = torch_export.export_state_dict(params, config, fmt)
  model = timm_classifier(pool)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  want = trainer.objective.predict(params, jnp.asarray(images))
  np.testing.assert_allclose(timm_logits(model, images), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_the_released_fine_tuned_layout_imports_and_gives_timms_logits(load_config):
  """A random timm model saved in the layout of mae_finetuned_vit_*.pth (learned pos_embed, fc_norm, head)."""
  torch.manual_seed(0)
  model = timm_classifier('gap')
  for p in model.parameters():  # not the init: every value matters
    p.data.normal_(0, 0.2)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  config = classifier_config(load_config)
  params = torch_import.import_state_dict(state_dict, config, 'mae-finetuned')
  images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
  got = tasks.model_for_params(config, params).predict(params, jnp.asarray(images))
  np.testing.assert_allclose(np.asarray(got), timm_logits(model, images), atol=1e-5, rtol=1e-5)


def test_the_linear_probe_moves_only_the_head_and_keeps_batchnorm_statistics(load_config):
  config = classifier_config(load_config, 'linprobe')
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = jax.device_get(state)
  assert set(state['collections']['batch_stats']) == {'mean', 'var'}
  assert not any("['encoder']" in jax.tree_util.keystr(p)
                 for p, _ in jax.tree_util.tree_flatten_with_path(state['opt_state'])[0])  # no moments for it
  for step in range(3):
    state, metrics = trainer.train_step(state, sharding.global_batch(trainer.loader.local_batch(step), trainer.mesh))
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after['params']['encoder'], before['params']['encoder'])
  assert not np.allclose(after['params']['head']['kernel'], before['params']['head']['kernel'])
  assert not np.allclose(after['collections']['batch_stats']['mean'], 0)
  assert float(metrics['grad_norm']) > 0  # the head's gradients only: the encoder's are not counted


@pytest.mark.slow
def test_warm_starting_from_a_checkpoint_without_a_fitting_encoder_is_one_clear_error(tmp_path, load_config):
  pretrain = load_config('mae_tiny_cpu')
  pretrain.model.variant = 'pico/4'
  source = tmp_path / 'pretrain'
  trainer = train.Trainer(pretrain, str(source), devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(source), pretrain.checkpoint)
  ckpt.save(1, trainer.init_state(), pretrain, force=True)
  ckpt.close()
  result = run_main('--config=configs/finetune_mae_tiny_cpu.py', f'--workdir={tmp_path / "ft"}',
                    f'--config.init_from={source}')  # nano/4 here, pico/4 there
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert 'the pretrained encoder does not fit config.model (variant nano/4)' in result.stderr
  assert 'it is 32 wide with 2 blocks, this model 64 wide with 4' in result.stderr


def test_the_learned_table_starts_from_the_pretrained_fixed_one_resampled_to_the_new_grid(tmp_path, load_config):
  pretrain = load_config('mae_tiny_cpu')
  pretrain.model.variant = 'pico/4'
  source = str(tmp_path / 'pretrain')
  ckpt = checkpoint.Checkpointer(source, pretrain.checkpoint)
  ckpt.save(1, train.Trainer(pretrain, source, devices=jax.devices()[:1]).init_state(), pretrain, force=True)
  ckpt.close()
  config = classifier_config(load_config)
  config.data.img_size = 48  # 12x12 patches here, 8x8 in the pretraining run
  config.init_from = source
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = train.warm_start(trainer.init_state(), trainer, source)
  from mae_jax.models import vit
  want = vit.resample_posemb(vit.posemb_sincos_2d(32, (8, 8))[None], 12)
  np.testing.assert_allclose(jax.device_get(state['params']['encoder']['pos_embed']), want, atol=1e-6)


# ---- end to end on the embedded digits ----

def final_top1(stdout):
  match = re.search(r'eval/top1 on digits/test: initial ([\d.]+) -> trained ([\d.]+)', stdout)
  assert match, stdout[-3000:]
  return float(match.group(2))


@pytest.fixture
def pretrained(demo_run):
  """The README's MAE demo run (conftest.py), the encoder the downstream demos start from."""
  return demo_run[0]


@pytest.mark.slow
@pytest.mark.parametrize('task,epochs', [('finetune', 8), ('linprobe', 4)])
def test_the_pretrained_encoder_beats_random_init_downstream(tmp_path, pretrained, task, epochs):
  """The README's downstream commands at 2/5 of their epochs (20 and 10 there), to keep CI short. Measured:
  fine-tuning 0.6167 pretrained vs 0.3500 random, the probe 0.4933 vs 0.4033."""
  runs = {}
  for arm, extra in (('pretrained', [f'--config.init_from={pretrained}']), ('random', [])):
    result = run_main(f'--config=configs/{task}_mae_tiny_cpu.py', f'--workdir={tmp_path / arm}',
                      f'--config.train.epochs={epochs}', *extra, optimized=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs[arm] = final_top1(result.stdout)
    assert os.listdir(tmp_path / arm / 'checkpoints_best')  # the best top-1 kept beside the latest
  assert runs['pretrained'] > runs['random'] + 0.05, runs


@pytest.mark.slow
def test_a_fine_tune_killed_midway_and_rerun_ends_bitwise_equal(tmp_path, pretrained):
  common = ['--config=configs/finetune_mae_tiny_cpu.py', f'--config.init_from={pretrained}',
            '--config.train.num_steps=30', '--config.checkpoint.every_steps=10', '--config.log.every_steps=5']
  whole = run_main(*common, f'--workdir={tmp_path / "whole"}')
  assert whole.returncode == 0, whole.stderr[-3000:]
  workdir = tmp_path / 'killed'
  process = start_main(*common, f'--workdir={workdir}')
  deadline = time.time() + 600
  while not os.path.isdir(workdir / 'checkpoints' / '20') and time.time() < deadline:
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_main(*common, f'--workdir={workdir}')
  assert resumed.returncode == 0 and 'Resuming from the checkpoint at step' in resumed.stdout, resumed.stderr[-3000:]
  a, b = checkpoint.load_params(str(tmp_path / 'whole'))[1], checkpoint.load_params(str(workdir))[1]
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_a_finetune_config_validates_its_section(load_config):
  c = load_config('finetune_mae_tiny_cpu')
  c.finetune.pool = 'max'
  with pytest.raises(config_lib.ConfigError, match="config.finetune.pool='max'"):
    config_lib.validate(c)
  c = load_config('finetune_mae_tiny_cpu')
  c.finetune.randaugment = 'rand-x9'
  with pytest.raises(config_lib.ConfigError, match='config.finetune.randaugment'):
    config_lib.validate(c)
