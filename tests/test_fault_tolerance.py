"""Preemption and faults: killed runs resume bitwise, interrupted checkpoints are skipped, non-finite steps
follow the configured policy, other models' checkpoints are refused, a full disk loses nothing."""
import os
import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from conftest import INJECT_NAN, QUICK, run_main, run_python, start_main

from mae_jax import checkpoint

STEPS = ['--config.train.num_steps=40']


def final_params(workdir):
  return checkpoint.load_params(workdir)[1]


def assert_bitwise_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference') / 'run')
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def wait_for_line(process, text, timeout=120):
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line and process.poll() is not None:
      break
    lines.append(line)
    if text in line:
      return lines
  process.kill()
  raise AssertionError(f'{text!r} never printed:\n' + ''.join(lines[-30:]))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  moments = random.Random(0)
  for _ in range(3):
    process = start_main(*QUICK, *STEPS, f'--workdir={workdir}')
    wait_for_line(process, 'Training mae')
    time.sleep(moments.uniform(0.5, 4.0))  # anywhere: mid-step, mid-save, mid-log
    process.kill()
    process.wait(timeout=30)
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert_bitwise_equal(final_params(workdir), final_params(uninterrupted))


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  process = start_main(*QUICK, '--config.train.num_steps=100000', f'--workdir={workdir}')
  wait_for_line(process, 'step 10/')
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=120)
  assert process.returncode == 0, output[-3000:]
  step = int(output.split('Preempted (SIGTERM) at step ')[1].split(':')[0])
  assert os.path.isdir(os.path.join(checkpoint.directory(workdir), str(step)))
  assert checkpoint.Checkpointer(workdir, _options()).latest_step() == step


def _options():
  from mae_jax.config import base_config
  return base_config().checkpoint


@pytest.mark.slow
def test_a_truncated_checkpoint_is_skipped_for_the_previous_one(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, workdir)
  latest = os.path.join(checkpoint.directory(workdir), '40', 'state')
  for folder, _, files in os.walk(latest):
    for name in files:
      path = os.path.join(folder, name)
      if os.path.getsize(path) > 1000:  # the array data: cut it in half
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'WARNING: the checkpoint of step 40' in result.stdout and 'unreadable' in result.stdout
  assert 'Resuming from the checkpoint at step 35' in result.stdout
  assert_bitwise_equal(final_params(workdir), final_params(uninterrupted))


@pytest.mark.slow
def test_a_save_killed_midway_leaves_no_checkpoint_behind(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, workdir)
  ckpts = checkpoint.directory(workdir)
  os.rename(os.path.join(ckpts, '40'), os.path.join(ckpts, '40.orbax-checkpoint-tmp-1234'))  # as a crash leaves it
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 35' in result.stdout
  assert_bitwise_equal(final_params(workdir), final_params(uninterrupted))




def run_with_nan(*args):
  return run_python(['-c', INJECT_NAN, *QUICK, *args], timeout=600, check=False)


@pytest.mark.slow
def test_a_nan_batch_is_skipped_and_counted(tmp_path):
  result = run_with_nan('--config.train.num_steps=20', '--config.train.on_nonfinite=skip', f'--workdir={tmp_path}/w')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Done: 20 steps' in result.stdout and '1 non-finite step(s) skipped' in result.stdout
  params = final_params(f'{tmp_path}/w')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_nan_batch_stops_the_run_naming_the_step(tmp_path):
  result = run_with_nan('--config.train.num_steps=20', '--config.train.on_nonfinite=stop', f'--workdir={tmp_path}/w')
  assert result.returncode == 1
  assert 'non-finite loss or gradients at step 13' in result.stderr and 'Traceback' not in result.stderr
  # Step 15's checkpoint would have been past the bad step: the last one is step 10, and it restores.
  assert checkpoint.Checkpointer(f'{tmp_path}/w', _options()).latest_step() == 10
  params = final_params(f'{tmp_path}/w')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_resuming_a_checkpoint_of_another_model_is_refused(uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, workdir)
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}', '--config.model.decoder.width=32')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert "config.model.decoder is {'depth': 2, 'num_heads': 4, 'width': 64} in the checkpoint" in result.stderr


@pytest.mark.slow
def test_init_from_warm_starts_the_matching_params(uninterrupted, tmp_path):
  result = run_main(*QUICK, '--config.train.num_steps=5', f'--workdir={tmp_path}/w', '--config.model.decoder.width=32',
                    f'--config.init_from={uninterrupted}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Warm start from' in result.stdout
  # The encoder came over unchanged in shape; the narrower decoder kept its own initialisation.
  assert 'decoder' in result.stdout.split('kept the initialisation of')[1]


@pytest.mark.slow
def test_restore_onto_another_mesh(tmp_path):
  workdir = str(tmp_path / 'run')
  first = run_main(*QUICK, '--config.train.num_steps=10', '--config.mesh.data=1', '--config.mesh.fsdp=8',
                   '--config.mesh.fsdp_min_size_mb=0', f'--workdir={workdir}', num_devices=8)
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_main(*QUICK, '--config.train.num_steps=20', '--config.mesh.data=4', f'--workdir={workdir}',
                    num_devices=4)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from the checkpoint at step 10' in second.stdout
  third = run_main(*QUICK, '--config.train.num_steps=25', f'--workdir={workdir}')
  assert third.returncode == 0 and 'Resuming from the checkpoint at step 20' in third.stdout


@pytest.fixture
def small_disk(tmp_path):
  mount_point = tmp_path / 'disk'
  mount_point.mkdir()
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=7m', 'tmpfs', str(mount_point)],
                    capture_output=True).returncode:
    pytest.skip('mounting a small tmpfs needs root')
  yield str(mount_point)
  subprocess.run(['umount', '-l', str(mount_point)])


@pytest.mark.slow
def test_a_full_disk_stops_with_a_message_and_keeps_the_previous_checkpoints(small_disk):
  workdir = os.path.join(small_disk, 'run')
  result = run_main(*QUICK, '--config.train.num_steps=40', '--config.checkpoint.keep=10', f'--workdir={workdir}')
  assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
  # Orbax's writer threads log their own error (before or after ours: they are threads); ours is one line.
  ours = [line for line in result.stderr.splitlines() if line.startswith('mae_jax: error:')]
  assert len(ours) == 1, result.stderr[-3000:]
  assert ours[0].startswith('mae_jax: error: saving the checkpoint of step') and 'No space left' in ours[0]
  assert 'are intact' in ours[0]
  steps = checkpoint.Checkpointer(workdir, _options()).manager.all_steps()
  assert steps, 'no checkpoint survived'
  params = final_params(workdir)  # the newest surviving checkpoint restores
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


# One update phase (a cond), two (a select).
@pytest.mark.parametrize('name', ['mae_tiny_cpu', pytest.param('gan_mae_tiny_cpu', marks=pytest.mark.slow)])
def test_a_nonfinite_step_keeps_the_params_and_optimizer_state_bitwise(load_config, name):
  from mae_jax import bench, train
  config = load_config(name)
  config.model.variant = 'pico/4'
  config.train.update(batch_size=8, num_steps=4)
  trainer = train.Trainer(config, loader=bench.SyntheticLoader(config, 1))
  batch = bench.SyntheticLoader(config, 1).local_batch(0)
  state, _ = trainer.train_step(trainer.init_state(), batch)  # the first step's learning rate is 0
  before = jax.device_get({k: state[k] for k in ('params', 'opt_state')})
  nan_batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
  state, metrics = trainer.train_step(state, nan_batch)
  assert not np.isfinite(metrics['loss']) and int(metrics['nonfinite_steps']) == 1
  assert_bitwise_equal(jax.device_get({k: state[k] for k in ('params', 'opt_state')}), before)
  state, metrics = trainer.train_step(state, batch)  # a finite step updates, and the run of bad steps is over
  assert np.isfinite(metrics['loss']) and int(state['nonfinite']['consecutive']) == 0
  assert not np.array_equal(jax.device_get(state['params']['encoder']['patch_embed']['proj']['kernel']),
                            before['params']['encoder']['patch_embed']['proj']['kernel'])
