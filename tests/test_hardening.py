"""Issue 11: a workdir lock, non-finite stops within a log interval, config drift on resume, SIGINT and
signals in every phase, logging that never kills a run."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import INJECT_NAN, QUICK, cpu_env, run_main, run_python, start_main

from mae_jax import checkpoint, config as config_lib, workdir as workdir_lib
from mae_jax.config import ConfigError


def steps_of(workdir):
  return [r['step'] for r in map(json.loads, open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r]


def checkpoint_steps(workdir):
  path = checkpoint.directory(workdir)
  return sorted(int(name) for name in os.listdir(path) if name.isdigit()) if os.path.isdir(path) else []


def one_error_line(result, exit_code=2):
  assert result.returncode == exit_code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('mae_jax: error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


# --- item 1: the workdir lock ---------------------------------------------------------------------------------


@pytest.mark.slow  # the quick tier has the in-process lock test below
def test_a_second_run_on_the_same_workdir_is_refused_and_the_first_finishes(tmp_path):
  workdir = str(tmp_path / 'run')
  args = [*QUICK, '--config.train.num_steps=40', '--config.checkpoint.every_steps=10', f'--workdir={workdir}']
  first = start_main(*args)
  lines = []
  for line in first.stdout:  # the lock is taken before anything is built: it is held by now
    lines.append(line)
    if 'Training mae' in line:
      break
  second = run_main(*args, '--config.train.blr=0.003')
  error = one_error_line(second)
  assert f'is in use by another run: pid {first.pid} on host {socket.gethostname()} since ' in error, error
  output = ''.join(lines) + first.communicate(timeout=600)[0]
  assert first.returncode == 0, output[-3000:]
  assert steps_of(workdir) == [5, 10, 15, 20, 25, 30, 35, 40]  # one run: every step once
  assert checkpoint_steps(workdir) == [20, 30, 40]
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))  # released at the end


def dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_the_lock_is_atomic_released_and_a_dead_runs_lock_is_taken_over(tmp_path, capsys):
  with workdir_lib.Lock(str(tmp_path)) as lock:
    held = json.load(open(lock.path))
    assert held['pid'] == os.getpid() and held['host'] == socket.gethostname()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f'in use by another run: pid {os.getpid()} on host'):
      workdir_lib.Lock(str(tmp_path)).acquire()
  assert not os.path.exists(lock.path)
  with open(lock.path, 'w') as f:  # a SIGKILLed run's lock
    json.dump({'pid': dead_pid(), 'host': socket.gethostname(), 'since': '2026-01-01 00:00:00 UTC'}, f)
  with workdir_lib.Lock(str(tmp_path)):
    assert json.load(open(lock.path))['pid'] == os.getpid()
  assert 'Taking over the lock of a run that is gone (pid ' in capsys.readouterr().out
  with open(lock.path, 'w') as f:  # another host's: its pid cannot be checked from here
    json.dump({'pid': dead_pid(), 'host': 'elsewhere', 'since': '2026-01-01 00:00:00 UTC'}, f)
  with pytest.raises(workdir_lib.WorkdirBusy, match='on host elsewhere since 2026-01-01 00:00:00 UTC'):
    workdir_lib.Lock(str(tmp_path)).acquire()
  assert workdir_lib.Lock(str(tmp_path), enabled=False).__enter__().held is None  # processes other than 0


# --- item 4: on_nonfinite=stop stops within a log interval ------------------------------------------------------

@pytest.mark.slow
def test_on_nonfinite_stop_stops_at_the_next_log_step(tmp_path):
  workdir = str(tmp_path / 'w')
  result = run_python(['-c', INJECT_NAN, *QUICK, '--config.train.num_steps=40', '--config.log.every_steps=2',
                       '--config.checkpoint.every_steps=10', f'--workdir={workdir}'], timeout=600, check=False)
  error = one_error_line(result, exit_code=1)
  assert 'non-finite loss or gradients at step 13 (config.train.on_nonfinite=stop; stopped at step 14)' in error
  assert max(steps_of(workdir)) == 14  # not 20, the next checkpoint
  assert max(checkpoint_steps(workdir)) == 10


# --- item 3: config drift on resume -----------------------------------------------------------------------------


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('drift') / 'run')
  result = run_main(*QUICK, '--config.train.num_steps=10', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / 'run')
  return str(tmp_path / 'run')


@pytest.mark.slow
def test_resuming_with_a_meaning_changing_config_is_refused_unless_allowed(ten_steps, tmp_path):
  workdir = copy_of(ten_steps, tmp_path)
  changed = [*QUICK, '--config.train.num_steps=20', '--config.train.blr=0.003', '--config.mae.mask_ratio=0.5',
             f'--workdir={workdir}']
  error = one_error_line(run_main(*changed))
  assert 'with a config that changes the run: mae.mask_ratio: 0.75 -> 0.5; train.blr: 0.0015 -> 0.003.' in error
  assert error.endswith('--config.allow_config_change=mae.mask_ratio,train.blr'), error
  assert checkpoint_steps(workdir) == checkpoint_steps(ten_steps)  # nothing written
  result = run_main(*changed, '--config.allow_config_change=mae,train.blr')
  assert result.returncode == 0, result.stderr[-3000:]
  assert ('Config changes since that checkpoint: mae.mask_ratio: 0.75 -> 0.5; train.blr: 0.0015 -> 0.003; '
          'train.num_steps: 10 -> 20') in result.stdout


@pytest.mark.slow
def test_harmless_changes_are_listed_and_a_finished_run_says_so(ten_steps, tmp_path):
  workdir = copy_of(ten_steps, tmp_path)
  result = run_main(*QUICK, '--config.train.num_steps=10', '--config.log.every_steps=2', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Config changes since that checkpoint: log.every_steps: 5 -> 2' in result.stdout
  assert 'Already finished at step 10 (this config trains 10 steps)' in result.stdout
  assert steps_of(workdir) == steps_of(ten_steps)  # no final evaluation or log appended


def test_config_changes_classifies_fields():
  config = config_lib.tiny_cpu_config()
  saved = config.to_dict()
  config.data.crop_scale = (0.3, 1.0)
  config.eval.knn_k = 5
  config.train.epochs = 40
  harmless, refused = checkpoint.config_changes(saved, config)
  assert [f for f, _ in harmless] == ['eval.knn_k', 'train.epochs']
  assert refused == [('data.crop_scale', 'data.crop_scale: [0.5, 1.0] -> [0.3, 1.0]')]
  config.allow_config_change = 'data.crop_scale'
  assert checkpoint.config_changes(saved, config)[1] == []
  config.allow_config_change = 'data.crop'
  with pytest.raises(ConfigError, match="config.allow_config_change: 'data.crop' is not a field or section"):
    config_lib.validate(config)


# --- item 5: SIGINT, and signals in every phase -----------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path):
  workdir = str(tmp_path / 'run')
  process = start_main(*QUICK, '--config.train.num_steps=100000', f'--workdir={workdir}')
  for line in process.stdout:
    if 'step 10/' in line:
      break
  process.send_signal(signal.SIGINT)
  output = process.communicate(timeout=120)[0]
  assert process.returncode == 130, output[-3000:]
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output[-3000:]
  step = int(output.split('Interrupted (SIGINT) at step ')[1].split(':')[0])
  assert f'checkpoint saved in {checkpoint.directory(workdir)}; rerun the same command to resume.' in output
  assert checkpoint_steps(workdir)[-1] == step
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


SIGNAL_IN_PHASE = textwrap.dedent('''
    import os, signal, sys
    from absl import app
    from mae_jax import checkpoint, main, train
    phase, name = sys.argv[1], sys.argv[2]
    send = lambda: os.kill(os.getpid(), getattr(signal, name))
    if phase == 'start-up':
      original_init = train.Trainer.__init__
      def init(self, *args, **kwargs):
        send()
        original_init(self, *args, **kwargs)
      train.Trainer.__init__ = init
    else:  # just after the last save has finished, before the final evaluation
      original_close, closed = checkpoint.Checkpointer.close, []
      def close(self):
        original_close(self)
        if not closed:
          closed.append(1)
          send()
      checkpoint.Checkpointer.close = close
    app.run(main.main, argv=['main'] + sys.argv[3:], flags_parser=main.parse_flags)
''')


@pytest.mark.parametrize('phase, name, exit_code, line', [
    ('start-up', 'SIGTERM', 0, 'Preempted (SIGTERM) during start-up, before any step: nothing to save; rerun the same '
                               'command to resume.'),
    pytest.param('final', 'SIGINT', 130, 'Interrupted (SIGINT) at step 5, the last: checkpoint saved in',
                 marks=pytest.mark.slow),
])
def test_a_signal_outside_the_loop_is_one_line_and_loses_nothing(tmp_path, phase, name, exit_code, line):
  workdir = str(tmp_path / 'run')
  result = run_python(['-c', SIGNAL_IN_PHASE, phase, name, *QUICK, '--config.train.num_steps=5',
                       f'--workdir={workdir}'], check=False)
  assert result.returncode == exit_code, (result.stdout[-3000:], result.stderr[-3000:])
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert line in result.stdout, result.stdout[-3000:]
  assert checkpoint_steps(workdir)[-1:] == ([] if phase == 'start-up' else [5])
  assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_NAME))


def test_a_second_ctrl_c_exits_at_once():
  script = textwrap.dedent('''
      import os, signal, time
      from mae_jax import preemption
      watch = preemption.PreemptionWatch(on_abort=lambda: print('released', flush=True))
      watch.start_training(None)
      os.kill(os.getpid(), signal.SIGINT)
      assert watch.reached(1)  # the first one only asks the loop to save
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)
  ''')
  result = subprocess.run([sys.executable, '-c', script], env=cpu_env(), text=True, capture_output=True, timeout=60)
  assert result.returncode == 130, result.stderr
  assert result.stdout == 'released\n'
  assert result.stderr.strip() == ('Interrupted (SIGINT) again: exiting at once, without saving; the last checkpoint '
                                   'is intact.')


# --- item 6: logging never kills a run --------------------------------------------------------------------------

FAILING_GRID = textwrap.dedent('''
    import sys
    from absl import app
    from mae_jax import main, metrics
    def image_grid(*args):
      raise ValueError('no panels')
    metrics.image_grid = image_grid
    app.run(main.main, argv=['main'] + sys.argv[1:], flags_parser=main.parse_flags)
''')


@pytest.mark.slow
def test_a_failing_image_grid_is_one_warning_and_the_checkpoints_are_written(tmp_path):
  workdir = str(tmp_path / 'run')
  result = run_python(['-c', FAILING_GRID, *QUICK, '--config.train.num_steps=10', '--config.log.images_every_steps=5',
                       f'--workdir={workdir}'], check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in result.stdout.splitlines() if line.startswith('WARNING')]
  assert warnings == ['WARNING: the image grid failed at step 5 (ValueError: no panels); training goes on without it']
  assert checkpoint_steps(workdir)[-2:] == [5, 10]


@pytest.mark.parametrize('override, message', [
    ('log.num_images=0', 'config.log.num_images=0 must be >= 1'),
    ('log.images_every_steps=0', 'config.log.images_every_steps must be positive'),
    ('seed=-1', 'config.seed=-1 must be >= 0'),
    ('eval.knn_bank_size=-5', 'knn_bank_size must be >= 0'),
    ('data.crop_scale=(0.2,0.5,1.0)', 'config.data.crop_scale and config.data.crop_ratio need two values'),
])
def test_logging_and_other_values_are_validated(override, message):
  config = config_lib.tiny_cpu_config()
  key, value = override.split('=')
  node = config
  *sections, field = key.split('.')
  for section in sections:
    node = node[section]
  node[field] = eval(value)  # pylint: disable=eval-used  # the literals above
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    config_lib.validate(config)


# --- item 2: checksums ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bit_flipped_checkpoint_is_set_aside_for_the_previous_one(ten_steps, tmp_path):
  workdir = copy_of(ten_steps, tmp_path)
  latest = os.path.join(checkpoint.directory(workdir), '10')
  assert os.path.exists(os.path.join(latest, checkpoint.CHECKSUMS))
  flipped = 0
  for folder, _, files in os.walk(os.path.join(latest, 'state')):
    for name in files:
      path = os.path.join(folder, name)
      if os.path.getsize(path) > 1000:  # the array data: a few flipped bits, sizes unchanged
        with open(path, 'r+b') as f:
          f.seek(os.path.getsize(path) // 2)
          byte = f.read(1)[0]
          f.seek(-1, os.SEEK_CUR)
          f.write(bytes([byte ^ 0x41]))
        flipped += 1
  assert flipped
  result = run_main(*QUICK, '--config.train.num_steps=10', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  warnings = [line for line in (result.stdout + result.stderr).splitlines() if 'unreadable' in line]
  assert len(warnings) == 1 and warnings[0].startswith('WARNING: the checkpoint of step 10 in '), warnings
  assert 'ChecksumMismatch: state/' in warnings[0] and 'does not match the checksum written with it' in warnings[0]
  assert 'Resuming from the checkpoint at step 5' in result.stdout
  assert any(name.startswith('10.unreadable-') for name in os.listdir(checkpoint.directory(workdir)))


# --- item 7: image folders --------------------------------------------------------------------------------------


def test_an_image_folder_walk_skips_loops_outside_links_fifos_and_warns_about_empty_classes(tmp_path, capsys):
  from mae_jax.data import sources
  train = tmp_path / 'train'
  for name in 'abcd':
    (train / name).mkdir(parents=True)
  for path in ('a/1.png', 'a/sub/2.png', 'b/3.png', 'c/readme.txt'):
    (train / path).parent.mkdir(exist_ok=True)
    (train / path).write_bytes(b'not decoded here')
  os.symlink('.', train / 'a' / 'loop')       # a loop: each image once, not 41 times
  os.symlink('..', train / 'a' / 'up')        # the split: b's images must not become class a's
  os.symlink('sub', train / 'a' / 'again')    # a second way into a folder already walked
  os.mkfifo(train / 'b' / 'pipe.png')        # opening it would block a decode thread forever
  source = sources.FolderSource(str(tmp_path), 'train')
  assert [source.describe(i)[len(str(train)) + 1:] for i in range(len(source))] == ['a/1.png', 'a/sub/2.png', 'b/3.png']
  assert source.labels.tolist() == [0, 0, 1] and source.num_classes == 4
  assert source.ignored_files == 2  # readme.txt, the FIFO
  assert (f"WARNING: 2 class folder(s) of {train} hold no image files: ['c', 'd']; their labels are kept"
          in capsys.readouterr().out)


# --- item 8: the export/import commands: one line, the right exit code --------------------------------------------


@pytest.mark.slow
def test_export_and_import_errors_are_one_line(ten_steps, tmp_path):
  from conftest import run_cli
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'noise.safetensors').write_bytes(os.urandom(64))
  out = f'--out={tmp_path}/x.pth'
  cases = [
      (['--workdir=/nonexistent/run', out], 2, '--workdir=/nonexistent/run does not exist'),
      ([f'--workdir={tmp_path}/empty', out], 2, 'holds no checkpoint'),
      ([f'--workdir={ten_steps}', '--step=7', out], 2, '--step=7: no such checkpoint in'),
      ([f'--workdir={ten_steps}', f'--out={tmp_path}/x.npz'], 2, "must end in .pth or .pt or .safetensors"),
      (['import', f'--in={tmp_path}/missing.pth', '--config=configs/mae_tiny_cpu.py', f'--out={tmp_path}/p.msgpack'],
       2, 'is not a file'),
      (['import', f'--in={tmp_path}/noise.safetensors', '--config=configs/mae_tiny_cpu.py',
        f'--out={tmp_path}/p.msgpack'], 2, 'is not a PyTorch or safetensors file'),
  ]
  for args, exit_code, text in cases:
    result = run_cli('export', *args)
    assert result.returncode == exit_code, (args, result.stderr[-2000:])
    assert 'Traceback' not in result.stderr, (args, result.stderr[-3000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith('mae_jax.export: error: ')]
    assert len(lines) == 1 and text in lines[0], (args, result.stderr[-2000:])


@pytest.mark.parametrize('args, text', [
    (['--config=configs/nope.py'], "No such file or directory: 'configs/nope.py'"),
    (['--config=configs/mae_tiny_cpu.py', '--steps=0'], '--steps=0 must be >= 1'),
    (['--config=configs/mae_tiny_cpu.py', '--warmup=-1'], '--warmup=-1 must be >= 0'),
])
def test_bench_argument_errors_are_one_line(args, text):
  from conftest import run_cli
  result = run_cli('bench', *args)
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('mae_jax.bench: error: ') and text in lines[0], lines


@pytest.mark.parametrize('args, text', [
    (['--config=README.md'], '--config=README.md is not a Python config file (unterminated string literal'),
    (['--config=mae_jax/metrics.py'], '--config=mae_jax/metrics.py has no get_config() function'),
    (['--config=configs/mae_tiny_cpu.py', '--config.train.batch_size=abc'],
     "flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    (['--config=configs/mae_tiny_cpu.py', '--config.train.batchsize=3'],
     "'batchsize' Did you mean \"batch_size\" instead of \"batchsize\"?"),
    (['--config=configs/mae_tiny_cpu.py', '--config.allow_config_change=train.nope'],
     "config.allow_config_change: 'train.nope' is not a field or section of the config"),
])
def test_main_argument_errors_are_one_line(args, text, tmp_path):
  error = one_error_line(run_main(*args, f'--workdir={tmp_path}/w'))
  assert text in error, error


def test_a_missing_workdir_flag_is_one_line():
  assert 'Flag --workdir must have a value' in one_error_line(run_main('--config=configs/mae_tiny_cpu.py'))


def test_a_missing_init_from_is_one_line(tmp_path):
  error = one_error_line(run_main(*QUICK, '--config.train.num_steps=1', f'--config.init_from={tmp_path}/missing.msgpack',
                                  f'--workdir={tmp_path}/w'))
  assert f'config.init_from={tmp_path}/missing.msgpack does not exist' in error, error
