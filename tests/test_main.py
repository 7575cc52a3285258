"""The command line end to end: the README's demo run, resume, and one clear message per user mistake."""
import glob
import json
import os
import re
import struct

import pytest
from cli import run_main
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


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
  """The README's main command, run to completion once for the tests below."""
  workdir = str(tmp_path_factory.mktemp('demo') / 'mae_tiny')
  result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def test_demo_loss_falls_and_knn_beats_random_init(demo_run):
  workdir, stdout = demo_run
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  losses = [r['loss'] for r in records if 'loss' in r]
  assert len(losses) >= 10 and losses[-1] < 0.6 * losses[0]
  match = re.search(r'random init ([\d.]+) -> trained ([\d.]+)', stdout)
  assert match, stdout[-2000:]
  random_init, trained = map(float, match.groups())
  assert trained > random_init + 0.03


def test_demo_writes_an_orbax_checkpoint_and_tensorboard_images(demo_run):
  workdir, stdout = demo_run
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-1] == 460, steps
  events = tensorboard_events(os.path.join(workdir, 'tensorboard'))
  tags = {v.tag for e in events for v in e.summary.value}
  assert {'loss', 'lr', 'knn/top1', 'perf/images_per_sec', 'reconstruction'} <= tags
  images = [v.image for e in events for v in e.summary.value if v.tag == 'reconstruction']
  # A PNG grid: one row per sample, three columns (original | masked | reconstruction).
  assert images and images[-1].encoded_image_string[:4] == b'\x89PNG' and images[-1].width > 2 * images[-1].height / 8


def test_running_the_same_command_again_resumes(demo_run):
  workdir, _ = demo_run
  result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 460' in result.stdout
  assert 'Done: 0 steps' in result.stdout


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
