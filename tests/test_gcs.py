"""`gs://` end to end against a Cloud Storage emulator on localhost (tests/gcs_emulator.py starts and stops it):
a run trains into a bucket, is killed and resumes bitwise equal, exports to PyTorch from the bucket, warm-starts
another run that reads an image folder from the bucket; a missing bucket, a bucket without the run and missing
credentials are one line each. The workdir lock and metrics.jsonl, which an object store cannot make atomic
the local way, are checked on their own.
"""
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import QUICK, cpu_env, run_cli, run_main, start_main
from gcs_emulator import gcs  # noqa: F401  # pylint: disable=unused-import  # the fixture
from PIL import Image
from test_fault_tolerance import assert_bitwise_equal, wait_for_line

from mae_jax import checkpoint, metrics, paths
from mae_jax import workdir as workdir_lib

STEPS = ['--config.train.num_steps=10']


def one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.startswith('mae_jax') and ': error:' in line]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[0]


@pytest.fixture(scope='module')
def bucket_run(gcs):  # pylint: disable=redefined-outer-name
  """The quick config trained uninterrupted into gs://runs/run: (workdir, stdout)."""
  gcs.create_bucket('runs')
  workdir = 'gs://runs/run'
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}', env=gcs.env)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


@pytest.mark.slow
def test_a_run_trains_into_a_bucket(bucket_run):  # pylint: disable=redefined-outer-name
  workdir, stdout = bucket_run
  assert f'checkpoint at step 10 in {workdir}/checkpoints' in stdout
  names = paths.listdir(workdir)
  assert {'checkpoints', 'metrics.jsonl', 'tensorboard'} <= set(names)
  assert workdir_lib.LOCK_NAME not in names  # released at the end
  steps = sorted(int(s) for s in paths.listdir(checkpoint.directory(workdir)) if s.isdigit())
  assert steps == [1, 5, 10]  # orbax saves a fresh run's first step too, as locally
  for step in steps:  # orbax's commit marker and our checksums, in every step
    folder = paths.join(checkpoint.directory(workdir), str(step))
    assert {'commit_success.txt', checkpoint.CHECKSUMS} <= set(paths.listdir(folder))
    checkpoint.verify_checksums(folder)
  assert [r['step'] for r in metrics.read_jsonl(workdir) if 'loss' in r] == [5, 10]
  assert any(name.startswith('events.out.tfevents') for name in paths.listdir(paths.join(workdir, 'tensorboard')))


@pytest.mark.slow
def test_a_run_killed_in_a_bucket_resumes_bitwise_equal(gcs, bucket_run):  # pylint: disable=redefined-outer-name
  workdir = 'gs://runs/killed'
  process = start_main(*QUICK, *STEPS, f'--workdir={workdir}', env=gcs.env)
  wait_for_line(process, 'step 5/')
  deadline = time.monotonic() + 60  # killed once step 5's checkpoint is committed: a resume, not a restart
  while not paths.exists(paths.join(checkpoint.directory(workdir), '5', 'commit_success.txt')):
    assert time.monotonic() < deadline and process.poll() is None, 'step 5 never committed'
    time.sleep(0.1)
  process.kill()
  process.wait(timeout=30)
  result = run_main(*QUICK, *STEPS, f'--workdir={workdir}', env=gcs.env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from the checkpoint at step' in result.stdout
  # SIGKILL left the lock behind: this host, a dead pid, so it was taken over.
  assert 'Taking over the lock of a run that is gone' in result.stdout
  assert_bitwise_equal(checkpoint.load_params(workdir)[1], checkpoint.load_params(bucket_run[0])[1])
  # Flushed with each save: no step is missing (a step after the last commit is logged again on resume).
  assert sorted(set(r['step'] for r in metrics.read_jsonl(workdir) if 'loss' in r)) == [5, 10]


@pytest.mark.slow
def test_export_to_pytorch_from_the_bucket(bucket_run, gcs, tmp_path):  # pylint: disable=redefined-outer-name
  import torch
  out = tmp_path / 'mae.pth'
  result = run_cli('export', f'--workdir={bucket_run[0]}', '--format=mae-official', f'--out={out}', env=gcs.env)
  assert result.returncode == 0, result.stderr[-3000:]
  state_dict = torch.load(out, weights_only=True)['model']
  params = checkpoint.load_params(bucket_run[0])[1]
  np.testing.assert_array_equal(state_dict['patch_embed.proj.bias'].numpy(),
                                np.asarray(params['encoder']['patch_embed']['proj']['bias']))


def write_image_folder(root, classes=2, per_class=8):
  rng = np.random.default_rng(0)
  for label in range(classes):
    for i in range(per_class):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format='PNG')
      with paths.open_file(f'{root}/train/class_{label}/{i:02d}.png', 'wb') as f:
        f.write(buffer.getvalue())
  with paths.open_file(f'{root}/train/class_0/.hidden.png', 'wb') as f:
    f.write(b'not an image')


@pytest.fixture(scope='module')
def image_folder(gcs):  # pylint: disable=redefined-outer-name
  root = gcs.create_bucket('images') + '/digits'
  write_image_folder(root)
  return root


def test_an_image_folder_in_a_bucket_is_listed_and_read(image_folder):  # pylint: disable=redefined-outer-name
  from mae_jax.data import sources
  source = sources.FolderSource(image_folder, 'train')
  assert (len(source), source.classes, source.ignored_files) == (16, ['class_0', 'class_1'], 1)  # .hidden.png
  assert source.path(15) == f'{image_folder}/train/class_1/07.png'
  image, label = source[15]
  assert np.asarray(image).shape == (32, 32, 3) and label == 1


@pytest.mark.slow
def test_warm_start_from_the_bucket_on_an_image_folder_in_the_bucket(bucket_run, image_folder, gcs):  # pylint: disable=redefined-outer-name
  result = run_main(*QUICK, '--config.train.num_steps=2', '--config.train.batch_size=8', '--workdir=gs://runs/warm',
                    '--config.data.source=folder', f'--config.data.name={image_folder}',
                    f'--config.init_from={bucket_run[0]}', env=gcs.env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Warm start from {bucket_run[0]}: loaded' in result.stdout and 'Done: 2 steps' in result.stdout


@pytest.mark.slow
def test_a_missing_bucket_or_run_is_one_line(gcs):  # pylint: disable=redefined-outer-name
  result = run_main(*QUICK, '--workdir=gs://no-such-bucket/run', env=gcs.env)
  assert result.returncode == 2
  assert one_error_line(result) == ('mae_jax: error: --workdir=gs://no-such-bucket/run: the bucket '
                                    'gs://no-such-bucket does not exist (create it with `gcloud storage buckets '
                                    'create gs://no-such-bucket`)')
  gcs.create_bucket('empty')
  result = run_cli('export', '--workdir=gs://empty/run', '--format=mae-official', '--out=x.pth', env=gcs.env)
  assert result.returncode == 2
  assert one_error_line(result) == 'mae_jax.export: error: --workdir=gs://empty/run does not exist'
  result = run_main(*QUICK, '--workdir=gs://empty/run', '--config.init_from=gs://empty/nothing', env=gcs.env)
  assert result.returncode == 2
  assert one_error_line(result).startswith('mae_jax: error: config.init_from=gs://empty/nothing does not exist')
  assert not paths.exists('gs://empty/run')  # refused before anything was written


def test_a_gs_workdir_without_credentials_fails_in_one_line_and_quickly():
  """The documented paper commands, on a machine with no emulator and no credentials: past the workdir
  checks (no local 'parent directory' of a URL), one line about credentials or the bucket, in seconds."""
  env = {k: v for k, v in cpu_env().items() if not k.startswith(('STORAGE_EMULATOR', 'TENSORSTORE_GCS',
                                                                   'GOOGLE_'))}
  env['GCE_METADATA_HOST'] = env['GCE_METADATA_IP'] = '127.0.0.1:9'  # nothing listens: as off Google Cloud
  started = time.monotonic()
  result = subprocess.run([sys.executable, '-m', 'mae_jax.main', '--config=configs/mae_vitl.py',  # launch/README's
                           '--workdir=gs://BUCKET/mae_vitl', '--config.data.source=tfds',
                           '--config.data.name=imagenet2012'], cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=env, capture_output=True, text=True, timeout=120)
  elapsed = time.monotonic() - started
  assert result.returncode == 2
  line = one_error_line(result)
  assert line.startswith('mae_jax: error: --workdir=gs://BUCKET/mae_vitl: ') and 'parent directory' not in line
  assert 'credentials' in line or 'gs://BUCKET' in line.split(': ', 2)[2]  # a machine with credentials: the bucket
  assert elapsed < 60, elapsed


# ---- what an object store cannot do atomically ----

def dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_the_bucket_lock_is_exclusive_released_and_taken_over_when_stale(gcs, capsys):  # pylint: disable=redefined-outer-name
  workdir = gcs.create_bucket('locks') + '/run'
  with workdir_lib.Lock(workdir) as lock:
    held = json.loads(paths.read_bytes(lock.path))
    assert held['pid'] == os.getpid() and held['host'] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f'in use by another run: pid {os.getpid()} on host'):
      workdir_lib.Lock(workdir).acquire()
  assert not paths.exists(lock.path)
  stale = {'pid': dead_pid(), 'host': socket.gethostname(), 'since': '2026-01-01 00:00:00 UTC'}
  with paths.open_file(lock.path, 'w') as f:  # a SIGKILLed run's lock on this host
    f.write(json.dumps(stale))
  with workdir_lib.Lock(workdir):
    assert json.loads(paths.read_bytes(lock.path))['pid'] == os.getpid()
  assert 'Taking over the lock of a run that is gone (pid ' in capsys.readouterr().out
  with paths.open_file(lock.path, 'w') as f:  # another host's, refreshed just now: busy
    f.write(json.dumps({**stale, 'host': 'elsewhere'}))
  with pytest.raises(workdir_lib.WorkdirBusy, match='on host elsewhere since 2026-01-01 00:00:00 UTC, its lock refreshed'):
    workdir_lib.Lock(workdir).acquire()


def test_metrics_in_a_bucket_are_buffered_flushed_whole_and_kept_on_resume(gcs):  # pylint: disable=redefined-outer-name
  workdir = gcs.create_bucket('logs') + '/run'
  writer = metrics.Writer(workdir, total_steps=4, start_step=0)
  writer.scalars(1, {'loss': 1.0})
  assert not paths.exists(writer.jsonl_path)  # buffered: nothing to append to
  writer.flush()
  writer.scalars(2, {'loss': 0.5})
  writer.close()
  resumed = metrics.Writer(workdir, total_steps=4, start_step=2)  # a resumed run keeps the earlier lines
  resumed.scalars(3, {'loss': 0.25})
  resumed.close()
  assert [(r['step'], r['loss']) for r in metrics.read_jsonl(workdir)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
