"""Shared test helpers: Python subprocesses with their own number of simulated CPU devices.

JAX fixes its device count when its backend starts, so tests that need 8 (or 2 x 4) devices run their
code in a subprocess whose XLA_FLAGS are set before JAX is imported; the pytest process itself keeps
whatever devices it has.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
CONFIGS = os.path.join(REPO, 'configs')


def load_config(name):
  """`configs/<name>.py`'s get_config(), as `--config=configs/<name>.py` loads it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(name='load_config', scope='session')
def load_config_fixture():
  """`load_config(name)`: the config of configs/<name>.py."""
  return load_config


def cpu_env(num_devices=None, **extra):
  """The environment of a CPU-only subprocess with `num_devices` simulated devices, importing this checkout."""
  env = dict(os.environ)
  env.pop('MAE_JAX_DISTRIBUTED', None)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
  if num_devices:
    flags.append(f'{DEVICE_COUNT_FLAG}={num_devices}')
  env.update(XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_python(args, num_devices=None, timeout=300, env=None, check=True):
  """Runs `python *args` in the repository root; fails the test with its output if it fails or times out."""
  try:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env or cpu_env(num_devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'python {" ".join(args)} timed out after {timeout}s\n{e.stdout}\n{e.stderr}')
  if check and result.returncode:
    pytest.fail(f'python {" ".join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}')
  return result


def last_json(stdout):
  """The last line of `stdout` that is a JSON object (how worker subprocesses report)."""
  for line in reversed(stdout.splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise AssertionError(f'no JSON line in the output:\n{stdout[-4000:]}')


@pytest.fixture(scope='session')
def subprocess_python():
  """`run_python(args, num_devices=None, timeout=300, env=None, check=True)` as a fixture."""
  return run_python


@pytest.fixture(scope='session')
def run_worker():
  """`run_worker(script, *args, num_devices=8, timeout=300)`: runs a test module as a script (its
  `__main__` part) on `num_devices` simulated CPU devices and returns the JSON object it printed last."""
  def run(script, *args, num_devices=8, timeout=300):
    return last_json(run_python([script, *map(str, args)], num_devices, timeout).stdout)
  return run


@pytest.fixture(name='cpu_env', scope='session')
def cpu_env_fixture():
  """`cpu_env(num_devices=None, **extra)`: environment for a CPU subprocess (for Popen)."""
  return cpu_env


def pytest_configure(config):
  config.addinivalue_line('markers', 'multidevice: runs code on several simulated CPU devices in a subprocess')
