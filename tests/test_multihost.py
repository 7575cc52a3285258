"""Multi-host training with real processes: two processes on localhost, 4 simulated CPU devices each, joined
with jax.distributed, train exactly like one process with 8 devices and write one checkpoint together, on a
local disk and in a bucket of the Cloud Storage emulator (tests/gcs_emulator.py).

Every wait has a timeout, and when one process fails the others are killed (they would otherwise wait in a
collective for the missing peer). The restore check runs this file as a script:
  python tests/test_multihost.py restore WORKDIR...
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import cpu_env, last_json, run_python, run_worker
from gcs_emulator import gcs  # noqa: F401  # pylint: disable=unused-import  # the fixture

from mae_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
TRAIN = ['-m', 'mae_jax.main', '--config=configs/mae_tiny_cpu.py', f'--config.train.num_steps={STEPS}',
         '--config.data.eval_split=', '--config.log.every_steps=1', '--config.log.images_every_steps=1000',
         '--config.checkpoint.every_steps=1000', '--config.mesh.data=2', '--config.mesh.fsdp=4',
         '--config.mesh.fsdp_min_size_mb=0']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(args, env, log_path):
  with open(log_path, 'w') as log:  # a file, not a pipe: a full pipe would block the process
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_all(procs, timeout):
  """Waits for every process; kills them all on the first failure or at the deadline. Returns the exit codes
  (None for a killed process)."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.returncode not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    codes = [p.poll() for p in procs]
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      try:
        p.wait(timeout=30)
      except subprocess.TimeoutExpired:
        pass
  return codes


def read_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [(r['step'], r['loss']) for r in rows if 'loss' in r]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  port = free_port()
  multi, single = tmp_path / 'two_processes', tmp_path / 'one_process'
  logs = [tmp_path / f'process_{i}.log' for i in range(2)] + [tmp_path / 'reference.log']
  # The two processes' mesh is hybrid: 'data' spans the processes (dcn_data=2), 'fsdp' the 4 devices of each.
  procs = [start([*TRAIN, f'--workdir={multi}', '--config.mesh.dcn_data=2', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', '--distributed_timeout=120'], cpu_env(4), logs[i])
           for i in range(2)]
  procs.append(start([*TRAIN, f'--workdir={single}'], cpu_env(8), logs[2]))
  codes = wait_all(procs, timeout=480)
  outputs = [log.read_text() for log in logs]
  assert codes == [0, 0, 0], '\n\n'.join(f'--- {log.name} (exit {c}):\n{o[-3000:]}'
                                          for log, c, o in zip(logs, codes, outputs))

  assert 'process 0/2, 4 local of 8 cpu devices' in outputs[0]
  assert f'step {STEPS}/{STEPS}' in outputs[0] and 'Done:' in outputs[0]
  assert f'step {STEPS}/{STEPS}' not in outputs[1] and 'Done:' not in outputs[1]  # only process 0 logs
  two, one = read_losses(multi), read_losses(single)
  assert [s for s, _ in two] == list(range(1, STEPS + 1))  # written once per step, by process 0
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=0, atol=1e-5)

  # One checkpoint, written by both processes together (each its own shards, process 0 the metadata) ...
  step_dir = multi / 'checkpoints' / str(STEPS)
  assert (step_dir / 'commit_success.txt').exists() or (step_dir / '_CHECKPOINT_METADATA').exists()
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(os.listdir(step_dir / 'state'))
  # ... that a single process with one device restores whole: the same state as the 8-device run's.
  result = run_worker(__file__, 'restore', multi, single, num_devices=1, timeout=180)
  assert result['steps'] == [STEPS, STEPS]
  assert result['max_abs_diff'] < 1e-5, result


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_checkpoint_into_a_bucket_that_one_process_restores(gcs, tmp_path):  # pylint: disable=redefined-outer-name
  from mae_jax import paths
  workdir = gcs.create_bucket('multihost') + '/run'
  port = free_port()
  logs = [tmp_path / f'process_{i}.log' for i in range(2)]
  procs = [start([*TRAIN, f'--workdir={workdir}', '--config.mesh.dcn_data=2', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', '--distributed_timeout=120'], cpu_env(4, **gcs.env), logs[i])
           for i in range(2)]
  codes = wait_all(procs, timeout=480)
  outputs = [log.read_text() for log in logs]
  assert codes == [0, 0], '\n\n'.join(f'--- {log.name} (exit {c}):\n{o[-3000:]}' for log, c, o in zip(logs, codes, outputs))
  step_dir = f'{workdir}/checkpoints/{STEPS}'
  assert 'commit_success.txt' in paths.listdir(step_dir)  # orbax's commit on an object store
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(paths.listdir(f'{step_dir}/state'))  # each host its shards
  assert [r['step'] for r in json.loads('[' + ','.join(paths.read_bytes(f'{workdir}/metrics.jsonl').decode()
                                                       .splitlines()) + ']') if 'loss' in r] == list(range(1, STEPS + 1))
  result = last_json(run_python([__file__, 'restore', workdir, workdir], timeout=180, env=cpu_env(1, **gcs.env)).stdout)
  assert result['steps'] == [STEPS, STEPS] and result['max_abs_diff'] == 0, result


# ---- distributed.plan: which runs initialise, without starting anything ----

def test_plan_explicit_flags_win():
  assert distributed.plan('10.0.0.1:1234', 2, 1, environ={}) == 'explicit'
  with pytest.raises(distributed.DistributedError, match='go together'):
    distributed.plan('10.0.0.1:1234', None, 1, environ={})
  with pytest.raises(distributed.DistributedError, match=r'must be in \[0, --num_processes=2\)'):
    distributed.plan('10.0.0.1:1234', 2, 2, environ={})


@pytest.mark.parametrize('environ, expected', [
    ({}, None),                                                           # one process: nothing to do
    ({'MAE_JAX_DISTRIBUTED': '1'}, 'auto'),                               # launch/ scripts (TPU VMs)
    ({'MAE_JAX_DISTRIBUTED': '0', 'SLURM_STEP_NUM_TASKS': '8', 'SLURM_PROCID': '0'}, None),
    ({'SLURM_STEP_NUM_TASKS': '8', 'SLURM_PROCID': '3', 'SLURM_JOB_ID': '7'}, 'auto'),   # srun, 8 tasks
    ({'SLURM_NTASKS': '8', 'SLURM_JOB_ID': '7'}, None),                   # the batch script itself, not srun
    ({'SLURM_STEP_NUM_TASKS': '1', 'SLURM_PROCID': '0'}, None),           # srun with one task
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'auto'),                              # mpirun -n 4
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'auto'),
    ({'TPU_WORKER_HOSTNAMES': 't1-w0,t1-w1'}, 'auto'),                    # a multi-host TPU slice (GKE)
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),                        # one TPU host
])
def test_plan_from_environment(environ, expected):
  assert distributed.plan(environ=environ) == expected


def test_plan_rejects_unclear_setting():
  with pytest.raises(distributed.DistributedError, match='use 1'):
    distributed.plan(environ={'MAE_JAX_DISTRIBUTED': 'maybe'})


# ---- the subprocess side ----

def worker_restore(*workdirs):
  """Restores each run's latest checkpoint onto one device, as resuming would; compares their states."""
  import jax
  import ml_collections
  from mae_jax import checkpoint, train
  states, steps = [], []
  for workdir in workdirs:
    saved_config, _ = checkpoint.load_params(workdir)
    config = ml_collections.ConfigDict(saved_config.to_dict())
    config.mesh.update(data=1, fsdp=1, dcn_data=1)
    trainer = train.Trainer(config, devices=jax.devices()[:1])
    state, step = checkpoint.Checkpointer(workdir, config.checkpoint).restore_latest(trainer.abstract_state, config)
    states.append(jax.device_get(state))
    steps.append(int(step))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                       if np.size(a) else 0.0, states[0], states[1])
  return {'steps': steps, 'max_abs_diff': max(jax.tree.leaves(diffs))}


if __name__ == '__main__':
  print(json.dumps({'restore': worker_restore}[sys.argv[1]](*sys.argv[2:])), flush=True)
