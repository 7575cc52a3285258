"""Shared test helpers, the one way for every test file to load configs and run the command line.

Plain functions and constants, imported by the test files (pytest puts tests/ on sys.path; so does running a
test file as a script): `from conftest import QUICK, load_config, run_main`.

  load_config(name)                      configs/<name>.py's get_config()
  run_cli(module, *args)                 `python -m mae_jax.<module> *args`, as a user runs it (run_main: main)
  start_main(*args)                      the same for mae_jax.main, started (a Popen, for killing it midway)
  run_python(args) / run_worker(script)  any Python subprocess / a test module's `__main__` part
  cpu_env(num_devices)                   the environment of those subprocesses

Every subprocess runs on the CPU in the repository root, importing this checkout. JAX fixes its device count
when its backend starts, so tests that need 8 (or 2 x 4) devices run their code in a subprocess whose
XLA_FLAGS are set before JAX is imported; the pytest process itself keeps whatever devices it has. The
session and its subprocesses share one XLA compilation cache, new for each session (JAX_COMPILATION_CACHE_DIR,
unless it is set already).

Markers: `multidevice` (several simulated devices, in a subprocess) and `slow` (long end-to-end runs);
`python -m pytest -m "not slow" tests` is the quick tier, every capability still run end to end once.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# Tests compile far more than they run: XLA:CPU's LLVM at -O0 compiles tiny programs about twice as fast and
# runs them about 2.5x slower, so the session and its subprocesses use it, and the long demo runs ask for
# optimised code (`optimized=True`). -O0 rounds differently (no fused multiply-adds): a test comparing with
# numbers the optimised code wrote runs in an optimised process of its own (`rerun_optimized`). Set before any
# test module imports JAX.
FAST_COMPILE_FLAG = '--xla_backend_optimization_level=0'
OPTIMIZED_PROCESS = 'MAE_JAX_TESTS_OPTIMIZED'
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', '') and OPTIMIZED_PROCESS not in os.environ:
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()
CONFIGS = os.path.join(REPO, 'configs')
# A fast tiny run of the CPU demo's config: no kNN, frequent logs and checkpoints, no images.
QUICK = ['--config=configs/mae_tiny_cpu.py', '--config.data.eval_split=', '--config.log.every_steps=5',
         '--config.checkpoint.every_steps=5', '--config.log.images_every_steps=1000']

# `python -c INJECT_NAN <main's args>`: the CLI with a NaN pixel in the batch of step 13 (non-finite tests).
INJECT_NAN = textwrap.dedent('''
    import sys
    import numpy as np
    from absl import app
    from mae_jax import main
    from mae_jax.data import loader

    original = loader.TrainLoader.iterate
    def iterate(self, start_step, end_step, prefetch=2):
      for step, batch in enumerate(original(self, start_step, end_step, prefetch), start_step):
        if step == 12:  # the batch of step 13 (steps count from 1)
          batch['image'][0, 0, 0, 0] = np.nan
        yield batch
    loader.TrainLoader.iterate = iterate
    app.run(main.main, argv=['main'] + sys.argv[1:], flags_parser=main.parse_flags)
''')


def load_config(name):
  """`configs/<name>.py`'s get_config(), as `--config=configs/<name>.py` loads it."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(name='load_config', scope='session')
def load_config_fixture():
  """`load_config(name)` as a fixture, for tests written against it; new tests import the function."""
  return load_config


def cpu_env(num_devices=None, optimized=False, **extra):
  """The environment of a CPU-only subprocess with `num_devices` simulated devices, importing this checkout;
  `optimized`: XLA's default optimisation (for long runs) instead of the tests' fast-compiling -O0."""
  env = dict(os.environ)
  env.pop('MAE_JAX_DISTRIBUTED', None)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith(DEVICE_COUNT_FLAG) and not (optimized and f == FAST_COMPILE_FLAG)]
  if num_devices:
    flags.append(f'{DEVICE_COUNT_FLAG}={num_devices}')
  env.update(XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_python(args, num_devices=None, timeout=300, env=None, check=True):
  """Runs `python *args` in the repository root and returns the CompletedProcess (stdout, stderr: text).
  Fails the test with the output if it times out, or, with `check`, if it exits non-zero."""
  args = [str(a) for a in args]
  try:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env or cpu_env(num_devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'python {" ".join(args)} timed out after {timeout}s\n{e.stdout}\n{e.stderr}')
  if check and result.returncode:
    pytest.fail(f'python {" ".join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}')
  return result


def run_cli(module, *args, num_devices=None, env=None, timeout=900, check=False, optimized=False):
  """`python -m mae_jax.<module> *args`, as a user runs it, on `num_devices` simulated CPU devices (default:
  one) with the variables of `env` added (XLA_FLAGS there replaces the device count). Returns the
  CompletedProcess whatever its exit status (`check=True`: fails the test on a non-zero one; `optimized`: see
  `cpu_env`)."""
  return run_python(['-m', f'mae_jax.{module}', *args], timeout=timeout, check=check,
                    env=cpu_env(num_devices, optimized, **(env or {})))


def run_main(*args, **kwargs):
  """`python -m mae_jax.main *args`: see `run_cli`."""
  return run_cli('main', *args, **kwargs)


def start_main(*args, num_devices=None, env=None):
  """`python -u -m mae_jax.main *args` started in the background: a Popen whose stdout (stderr merged in) is
  a text pipe, read line by line while it runs."""
  return subprocess.Popen([sys.executable, '-u', '-m', 'mae_jax.main', *map(str, args)], cwd=REPO,
                          env=cpu_env(num_devices, **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def rerun_optimized(request):
  """True after running the calling test again in a pytest process of its own with XLA's default optimisation
  (which it passed: the caller returns); False inside that process (the caller goes on)."""
  if os.environ.get(OPTIMIZED_PROCESS):
    return False
  nodeid = request.node.nodeid.split('@')[0]  # without xdist's '@group' suffix (loadgroup)
  run_python(['-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider', nodeid],
             env=cpu_env(optimized=True, **{OPTIMIZED_PROCESS: 1}))
  return True


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory, worker_id):
  """The README's main command (the MAE CPU demo), run to completion once per session: (workdir, stdout).
  Its tests (test_main.py) and the downstream demos that start from it (test_finetune.py) share it; under
  xdist its run is shared by the workers too (a file lock in their common temporary folder), should the
  scheduler place its users on more than one worker."""
  import filelock  # a dependency of torch, so of the test extras
  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == 'master' else root.parent
  workdir, stdout = root / 'demo' / 'mae_tiny', root / 'demo' / 'stdout.txt'
  with filelock.FileLock(str(root / 'demo.lock')):
    if not stdout.exists():
      workdir.parent.mkdir(exist_ok=True)
      result = run_main('--config=configs/mae_tiny_cpu.py', f'--workdir={workdir}', optimized=True)
      assert result.returncode == 0, result.stderr[-3000:]
      stdout.write_text(result.stdout)
  return str(workdir), stdout.read_text()


def last_json(stdout):
  """The last line of `stdout` that is a JSON object (how worker subprocesses report)."""
  for line in reversed(stdout.splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise AssertionError(f'no JSON line in the output:\n{stdout[-4000:]}')


def run_worker(script, *args, num_devices=8, timeout=300):
  """Runs a test module as a script (its `__main__` part) on `num_devices` simulated CPU devices and returns
  the JSON object it printed last."""
  return last_json(run_python([script, *args], num_devices, timeout).stdout)


_COMPILATION_CACHE = None


def pytest_configure(config):
  global _COMPILATION_CACHE
  config.addinivalue_line('markers', 'multidevice: runs code on several simulated CPU devices in a subprocess')
  config.addinivalue_line('markers', 'slow: a long end-to-end run, left out of the quick tier '
                          '(python -m pytest -m "not slow" tests); CI runs every test')
  # One XLA compilation cache for the session, empty at its start and shared with every subprocess (they
  # inherit the variable): a program compiled again (the tiny config's step, by every CLI run) is read back.
  if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _COMPILATION_CACHE = tempfile.mkdtemp(prefix='mae_jax_tests_xla_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE
    if 'jax' in sys.modules:  # imported already (by a plugin): it read the variable at import
      sys.modules['jax'].config.update('jax_compilation_cache_dir', _COMPILATION_CACHE)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs without it
def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pytest.ini): one worker per core, at most 4 (each runs subprocesses of several threads)."""
  return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  """Under xdist (`--dist loadgroup`), tests that share an expensive fixture run on one worker, so it is
  built once: the demo run (two modules) and each module-scoped fixture."""
  for item in items:
    scopes = {name: defs[-1].scope for name, defs in item._fixtureinfo.name2fixturedefs.items()}
    if 'demo_run' in scopes:
      item.add_marker(pytest.mark.xdist_group('demo_run'))
    elif 'module' in scopes.values():
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_unconfigure(config):
  if _COMPILATION_CACHE:
    shutil.rmtree(_COMPILATION_CACHE, ignore_errors=True)
