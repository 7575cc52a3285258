"""The command line end to end: a short run, the README's demo run, resume, and one clear message per user
mistake."""
import glob
import io
import json
import os
import re
import struct

import numpy as np
import pytest
from conftest import QUICK, load_config, run_main
from PIL import Image
from tensorboardX.proto import event_pb2


def tensorboard_events(logdir):
  """Parses TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
  events = []
  for path in glob.glob(os.path.join(logdir, 'events.out.tfevents.*')):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def last_grid(workdir):
  """The last 'reconstruction' image written to TensorBoard, decoded: (H, W, 3) uint8."""
  images = [v.image for e in tensorboard_events(os.path.join(workdir, 'tensorboard')) for v in e.summary.value
            if v.tag == 'reconstruction']
  assert images and images[-1].encoded_image_string[:4] == b'\x89PNG'
  return np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)))


def assert_grid_is_original_masked_reconstruction(grid):
  """The PNG grid (metrics.image_grid): one row per preview image, three columns, original | masked |
  reconstruction, each cell the image with 2 pixels of padding."""
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import train  # pylint: disable=g-import-not-at-top
  from mae_jax.models import vit  # pylint: disable=g-import-not-at-top
  config = load_config('mae_tiny_cpu')
  size, patch, pad = config.data.img_size, vit.parse_variant(config.model.variant)['patch_size'], 2
  cell = size + 2 * pad
  assert grid.shape == (config.log.num_images * cell, 3 * cell, 3) and grid.dtype == np.uint8, grid.shape
  cells = grid.reshape(config.log.num_images, cell, 3, cell, 3)[:, pad:pad + size, :, pad:pad + size]
  original, masked, reconstruction = (cells[:, :, i].astype(int) for i in range(3))
  # The preview is the first training batch; in the grid, normalised images * std + mean, as 8 bits.
  loader = train.Trainer(config, devices=jax.devices()[:1]).loader
  preview = next(loader.iterate(0, 1, prefetch=0))['image'][:config.log.num_images]
  shown = np.clip(preview * np.asarray(config.data.std) + np.asarray(config.data.mean), 0, 1) * 255
  np.testing.assert_allclose(original, shown, atol=2)
  # Masked patches are zeros, the normalised mean colour: 48 of the 64 patches of every masked image, and
  # none of the originals' pixels (the digits are grey). The visible ones, and the reconstruction's, are the
  # original's.
  mean_colour = (np.asarray(config.data.mean) * 255).astype(np.uint8)
  per_patch = lambda images: images.reshape(len(images), size // patch, patch, size // patch, patch, 3)
  is_mean = lambda images: np.all(per_patch(images) == mean_colour, axis=(2, 4, 5))
  hidden = is_mean(masked)
  num_patches = (size // patch)**2
  num_masked = num_patches - int(num_patches * (1 - config.mae.mask_ratio))
  assert hidden.sum(axis=(1, 2)).tolist() == [num_masked] * len(masked), hidden.sum(axis=(1, 2))
  assert not np.any(np.all(original == mean_colour, axis=-1))
  visible = ~hidden[:, :, None, :, None, None]
  assert np.all(np.where(visible, np.abs(per_patch(masked) - per_patch(original)), 0) <= 1)
  assert np.all(np.where(visible, np.abs(per_patch(reconstruction) - per_patch(original)), 0) <= 1)


@pytest.mark.slow
def test_a_short_run_checkpoints_and_shows_original_masked_reconstruction(tmp_path):
  workdir = str(tmp_path / 'run')
  result = run_main(*QUICK, '--config.train.num_steps=5', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Done: 5 steps' in result.stdout
  assert max(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()) == 5
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'loss' in r] == [5]
  assert_grid_is_original_masked_reconstruction(last_grid(workdir))  # the images of the last step


@pytest.mark.slow
def test_demo_loss_falls_and_knn_beats_random_init(demo_run):
  workdir, stdout = demo_run
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) >= 10 and losses[-1] < 0.6 * losses[0]
  match = re.search(r'random init ([\d.]+) -> trained ([\d.]+)', stdout)
  assert match, stdout[-2000:]
  random_init, trained = map(float, match.groups())
  assert trained > random_init + 0.03


@pytest.mark.slow
def test_demo_writes_an_orbax_checkpoint_and_tensorboard_images(demo_run):
  workdir, stdout = demo_run
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-1] == 460, steps
  events = tensorboard_events(os.path.join(workdir, 'tensorboard'))
  tags = {v.tag for e in events for v in e.summary.value}
  assert {'loss', 'lr', 'knn/top1', 'perf/images_per_sec', 'reconstruction'} <= tags
  assert_grid_is_original_masked_reconstruction(last_grid(workdir))


@pytest.mark.slow
def test_running_the_same_command_again_resumes(demo_run):
  workdir, _ = demo_run
  result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 460' in result.stdout
  assert 'Already finished at step 460' in result.stdout


@pytest.mark.slow
def test_an_interrupted_run_continues_where_it_stopped(tmp_path):
  workdir = str(tmp_path / 'run')
  common = ['--config=configs/mae_tiny_cpu.py', f'--workdir={workdir}', '--config.data.eval_split=',
            '--config.checkpoint.every_steps=10']
  first = run_main(*common, '--config.train.num_steps=20')
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_main(*common, '--config.train.num_steps=30')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 20' in second.stdout and 'steps 20->30' in second.stdout


@pytest.mark.parametrize('args,env,message', [
    (['--config.train.batchsize=3'], {}, 'Did you mean "batch_size"'),
    (['--config.mae.mask_ratio=1.5'], {}, 'config.mae.mask_ratio=1.5 must be in (0, 1)'),
    (['--config.train.batch_size=12'], {'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
     'config.train.batch_size=12 is not divisible by the 8 devices'),
    (['--config.model.variant=B/15'], {}, 'img_size=32 must be a positive multiple of the patch size 15'),
])
def test_user_mistakes_stop_with_one_clear_message(tmp_path, args, env, message):
  result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={tmp_path / "w"}', *args, env=env)
  assert result.returncode == 2
  assert message in result.stderr and 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')  # stopped before building anything


def test_missing_workdir_parent_is_one_clear_message(tmp_path):
  result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={tmp_path}/no/such/dir')
  assert result.returncode == 2 and 'does not exist' in result.stderr and 'Traceback' not in result.stderr
