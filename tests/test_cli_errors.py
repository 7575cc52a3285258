"""Issue 11, must-show 2: every command shown in README.md and in the configs' docstrings, run with bad
arguments (an unknown config field, a value of the wrong type or range, a missing flag, file or input, a bad
--format or --out, a stray argument, a file that is no PyTorch file), stops with one `<program>: error:` line
on stderr, no traceback, exit code 2, and creates or changes nothing.

The commands are read from the documentation, so a newly documented command (a new config's docstring) is
covered without a change here. Each runs in a sandbox: its paths (workdirs, --in, --out, init_from, gs://...)
point into a temporary folder. Every run must fail before anything compiles, so it is cheap; to keep the
~90 of them to seconds, they are forked from one Python process that imported jax, torch and mae_jax once
(about 6 s), and each fork runs its module as `python -m` does (runpy as `__main__`, its own stdout, stderr
and exit code), so a fork costs ~0.1 s instead of a 2-4 s interpreter start.
"""
import ast
import glob
import json
import os
import re
import shlex

import numpy as np
import pytest
import safetensors.numpy
from conftest import REPO, run_python

from mae_jax import config as config_lib
from mae_jax.config import ConfigError

PROGRAMS = {'mae_jax.main': 'mae_jax', 'mae_jax.export': 'mae_jax.export', 'mae_jax.bench': 'mae_jax.bench',
            'mae_jax.evaluate.fid': 'mae_jax.evaluate.fid', 'mae_jax.generate': 'mae_jax.generate'}


def documented_commands():
  """{command (a tuple of its words from `python`): [where it is shown]} for every `python -m mae_jax.<module>`
  in README.md's code blocks and in the docstrings of configs/*.py (continuation lines joined; `# comments`,
  `[optional parts]` and what follows `&&`, `|` or `;` dropped)."""
  with open(os.path.join(REPO, 'README.md')) as f:
    texts = [('README.md', block) for block in re.findall(r'^```[a-z]*\n(.*?)^```', f.read(), re.M | re.S)]
  for path in sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))):
    with open(path) as f:
      texts.append((os.path.relpath(path, REPO), ast.get_docstring(ast.parse(f.read())) or ''))
  commands = {}
  for where, text in texts:
    for line in text.replace('\\\n', ' ').splitlines():
      start = line.find('python -m mae_jax.')
      if start < 0:
        continue
      words, optional = [], False
      for word in shlex.split(line[start:], comments=True):
        if word in ('&&', '|', ';'):
          break
        optional = optional or word.startswith('[')
        if not optional:
          words.append(word)
        optional = optional and not word.endswith(']')
      commands.setdefault(tuple(words), []).append(where)
  return commands


def sandboxed(words, root):
  """The command's arguments with its paths moved under `root`, and a placeholder config
  (`configs/<objective>_<size>.py`) replaced by the first config it stands for."""
  args = []
  for word in words[3:]:
    name, eq, value = word.partition('=')
    if name == '--config' and '<' in value:
      value = os.path.relpath(sorted(glob.glob(os.path.join(REPO, re.sub(r'<[^>]+>', '*', value))))[0], REPO)
    elif eq and name != '--config' and re.search(r'/|^\$|^[A-Z_]+$|\.(pth|pt|ckpt|safetensors|msgpack)$', value):
      value = os.path.join(root, re.sub(r'^(gs://|\$|/)+', '', value))  # DIR, $DATA, gs://BUCKET/x, /tmp/x.pth
    args.append(f'{name}{eq}{value}' if eq else word)
  return args


def flag(args, name):
  return next((a.split('=', 1)[1] for a in args if a.startswith(f'--{name}=')), None)


def with_flag(args, name, value):
  """`--name=value` in the place of the command's own (its overrides must follow --config), or at the end."""
  if flag(args, name) is None:
    return [*args, f'--{name}={value}']
  return [f'--{name}={value}' if a.startswith(f'--{name}=') else a for a in args]


def without(args, name):
  """The command without `--name=...` (and its `--name.field=...` overrides)."""
  return [a for a in args if not a.startswith((f'--{name}=', f'--{name}.'))]


NOT_TORCH = bytes(range(7, 256))  # no torch.save or safetensors magic at its start
BAD_WEIGHTS = safetensors.numpy.save({'cls_token': np.full((1, 1, 4), np.nan, np.float32),
                                      'pos_embed': np.zeros((1, 5, 4), np.int64)})


def variants(module, args, root):
  """The bad variants of one documented command whose paths are in `root`: (name, arguments, text the error line
  must hold, {path: bytes} of files to make first, whether the config matters). Those where it does not (a
  stray argument, a missing flag, a bad --format, ...) run for the first command of each program only."""
  config = flag(args, 'config')
  per_config = [('an unknown config field', [*args, '--config.train.batchsize=3'],
                 '"batch_size" instead of "batchsize"', {}, True)] if config else []
  once = [('a stray argument', [*args, 'stray'], "unexpected arguments ['stray']", {}, False)]
  if config:
    once.append(('a missing config file', with_flag(args, 'config', f'{root}/nope.py'),
                 f"No such file or directory: '{root}/nope.py'", {}, False))
  if module == 'mae_jax.main':
    init_from = flag(args, 'config.init_from')
    if init_from:
      per_config.append(('as documented, its init_from missing', args,
                         f'config.init_from={init_from} does not exist', {}, True))
    return per_config + once + [
        ('a value out of range', [*args, '--config.seed=-1'], 'config.seed=-1 must be >= 0', {}, True),
        ('a value of the wrong type', [*args, '--config.train.batch_size=abc'],
         "flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'", {}, False),
        ('no --workdir', without(args, 'workdir'), 'Flag --workdir must have a value other than None', {}, False),
    ]
  if module == 'mae_jax.evaluate.fid':  # argparse's own one-line errors; no config
    return [('a stray argument', [*args, 'stray'], 'unrecognized arguments: stray', {}, False),
            ('as documented, its folders missing', args, 'is not a folder', {}, True)]
  if module == 'mae_jax.generate':
    missing = (f'--workdir={flag(args, "workdir")} does not exist' if flag(args, 'workdir') else
               f'--init_from={flag(args, "init_from")} is not a file')
    return per_config + once + [
        ('as documented, its model missing', args, missing, {}, True),
        ('a value out of range', [*args, '--num_iter=0'], '--num_iter=0 is out of range', {}, False),
        ('a value of the wrong type', [*args, '--num_images=x'], 'flag --num_images=x: invalid literal for int()', {},
         False),
        ('no --out', without(args, 'out'), 'Flag --out must have a value other than None', {}, False),
    ]
  if module == 'mae_jax.bench':
    return per_config + once + [
        ('a value out of range', [*args, '--steps=0'], '--steps=0 must be >= 1', {}, False),
        ('a value of the wrong type', [*args, '--steps=x'], 'flag --steps=x: invalid literal for int()', {}, False),
        ('no --config', without(args, 'config'), 'Flag --config must have a value other than None', {}, False),
    ]
  once += [
      ('a bad --format', with_flag(args, 'format', 'nope'), 'flag --format=nope: value should be one of <', {}, False),
      ('no --out', without(args, 'out'), 'Flag --out must have a value other than None', {}, False),
  ]
  if 'import' in args:
    not_torch, bad_weights = f'{root}/not_torch.pth', f'{root}/bad_weights.safetensors'
    return per_config + once + [
        ('as documented, its --in missing', args, f'--in={flag(args, "in")} is not a file', {}, True),
        ('a value out of range', with_flag([*args, '--config.seed=-1'], 'in', not_torch), 'config.seed=-1 must be >= 0',
         {not_torch: NOT_TORCH}, True),
        ('an --in with NaN and integer weights', with_flag(args, 'in', bad_weights),
         '2 tensor(s) of the file cannot be float32 weights:', {bad_weights: BAD_WEIGHTS}, True),
        ('an --in that is no PyTorch file', with_flag(args, 'in', not_torch),
         f'{not_torch} is not a PyTorch or safetensors file (truncated, corrupt, or not a checkpoint at all)',
         {not_torch: NOT_TORCH}, False),
        ('no --config', without(args, 'config'), 'import needs --in=FILE and --config=CONFIG', {}, False),
        ('an --out of the wrong kind', with_flag(args, 'out', f'{root}/params.pth'), 'must end in .msgpack', {},
         False),
    ]
  return once + [
      ('as documented, its workdir missing', args, f'--workdir={flag(args, "workdir")} does not exist', {}, True),
      ('a value of the wrong type', [*args, '--step=last'], 'flag --step=last: invalid literal for int()', {}, False),
      ('an --out of the wrong kind', with_flag(args, 'out', f'{root}/model.npz'),
       'must end in .pth or .pt or .safetensors', {}, False),
      ('a flag of import', [*args, '--in=x.pth'], '--in is a flag of import', {}, False),
  ]


def cases(root):
  """[(id, module, args, expected text, files to make, sandbox)] for the variants of each documented command,
  every one in a sandbox folder of its own under `root`."""
  out, programs = [], set()
  for n, (words, where) in enumerate(documented_commands().items()):
    program = words[2:4] if 'import' in words or words[2] == 'mae_jax.evaluate.fid' else words[2:3]
    first = program not in programs
    programs.add(program)
    for m, (name, *_, per_config) in enumerate(variants(words[2], sandboxed(words, ''), '')):
      if per_config or first:
        sandbox = f'{root}/{n}/{m}'
        _, args, text, files, _ = variants(words[2], sandboxed(words, sandbox), sandbox)[m]
        out.append((f'{where[0]}: {" ".join(words[2:])} | {name}', words[2], args, text, files, sandbox))
  return out


# Runs each job {'module', 'args', 'out'} in a fork, at most 3 at once, each killed after 120 s.
FORK_RUNNER = r'''
import json, os, runpy, signal, sys, time, traceback
import jax, flax.linen, optax, orbax.checkpoint, ml_collections, torch, safetensors.torch  # imported once
from mae_jax import train  # and what mae_jax.main imports, but not the CLI modules: they define flags
from mae_jax.export import torch_export, torch_import

def start(job):
  pid = os.fork()
  if pid:
    return pid
  out = os.open(job['out'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  err = os.open(job['out'] + '.err', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(out, 1)
  os.dup2(err, 2)
  sys.argv = [job['module'], *job['args']]
  code = 1
  try:
    runpy.run_module(job['module'], run_name='__main__', alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
  except BaseException:
    traceback.print_exc()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

jobs, results, running = json.load(open(sys.argv[1])), {}, {}
pending = list(range(len(jobs)))
while pending or running:
  while pending and len(running) < 3:
    n = pending.pop(0)
    running[start(jobs[n])] = (n, time.time())
  pid, status = os.waitpid(-1, os.WNOHANG)
  if pid:
    results[running.pop(pid)[0]] = os.waitstatus_to_exitcode(status)
    continue
  for pid, (n, since) in list(running.items()):
    if time.time() - since > 300:  # a busy 2-core machine: generous, only a hang reaches it
      os.kill(pid, signal.SIGKILL)
  time.sleep(0.01)
print(json.dumps([results[n] for n in range(len(jobs))]))
'''


def snapshot(root):
  """Every file and folder under `root`, with the size and modification time of the files."""
  found = []
  for folder, dirs, files in os.walk(root):
    found += [(os.path.join(folder, d), None) for d in dirs]
    for name in files:
      stat = os.stat(os.path.join(folder, name))
      found.append((os.path.join(folder, name), (stat.st_size, stat.st_mtime_ns)))
  return sorted(found)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """{case id: (exit code, stdout, stderr, expected text, the sandbox's files before, after)} of every case;
  each sandbox holds the parent folders of the case's paths (the paths themselves do not exist) and its files."""
  base = tmp_path_factory.mktemp('cli_errors')
  root, logs = str(base / 'sandbox'), base / 'logs'
  logs.mkdir()
  all_cases, before = cases(root), {}
  for _, _, args, _, files, sandbox in all_cases:
    os.makedirs(sandbox)
    for value in (a.split('=', 1)[-1] for a in args):
      if value.startswith(sandbox):
        os.makedirs(os.path.dirname(value), exist_ok=True)
    for path, data in files.items():
      with open(path, 'wb') as f:
        f.write(data)
    before[sandbox] = snapshot(sandbox)
  jobs = [{'module': module, 'args': args, 'out': str(logs / str(n))}
          for n, (_, module, args, *_) in enumerate(all_cases)]
  (base / 'jobs.json').write_text(json.dumps(jobs))
  codes = json.loads(run_python(['-c', FORK_RUNNER, base / 'jobs.json'], timeout=1500).stdout.splitlines()[-1])
  return {case_id: (code, (logs / str(n)).read_text(), (logs / f'{n}.err').read_text(), text, before[sandbox],
                    snapshot(sandbox))
          for n, ((case_id, _, _, text, _, sandbox), code) in enumerate(zip(all_cases, codes))}


CASE_IDS = [case[0] for case in cases('SANDBOX')]


@pytest.mark.parametrize('case_id', CASE_IDS, ids=CASE_IDS)
def test_a_documented_command_with_a_bad_argument_is_one_line_and_changes_nothing(results, case_id):
  code, stdout, stderr, text, before, after = results[case_id]
  program = PROGRAMS[case_id.split(': ', 1)[1].split()[0]]
  report = f'exit {code}\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}'
  assert 'Traceback' not in stderr, report
  errors = [line for line in stderr.splitlines() if line.startswith(f'{program}: error: ')]
  assert len(errors) == 1, report
  assert text in errors[0], report
  assert code == 2, report
  assert after == before, f'the run created, changed or removed files: {sorted(set(after) ^ set(before))}'


def test_the_commands_are_collected_from_every_place_that_shows_one():
  commands = documented_commands()
  assert {words[2] for words in commands} == set(PROGRAMS)
  assert ('python', '-m', 'mae_jax.main', '--config=configs/mae_tiny_cpu.py', '--workdir=workdirs/mae_tiny') in commands
  assert ('python', '-m', 'mae_jax.export', 'import', '--format=mae-official', '--in=mae_pretrain_vit_base.pth',
          '--config=configs/mae_vitb.py', '--allow_missing=decoder*,mask_token', '--out=init.msgpack') in commands
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    with open(path) as f:
      if 'python -m mae_jax.' in (ast.get_docstring(ast.parse(f.read())) or ''):
        assert any(os.path.relpath(path, REPO) in where for where in commands.values()), path
  usage = next(words for words in commands if '--workdir=DIR' in words and words[2] == 'mae_jax.main')
  assert not any('[' in word or '<' in word for word in sandboxed(usage, '/sandbox')), usage


# --- item 8: every field validated (the checks the bad variants above do not reach) ---------------------------


@pytest.mark.parametrize('override, message', [
    ('model.mlp_ratio=0.0', 'config.model.mlp_ratio=0.0 must be a positive number'),
    ("model.mlp_ratio=float('inf')", 'config.model.mlp_ratio=inf must be a positive number'),
    ('model.dropout=1.5', 'config.model.dropout=1.5 must be in [0, 1)'),
    ('model.decoder.num_heads=3', "config.model.decoder={'depth': 2, 'num_heads': 3, 'width': 64}: depth >= 0, "
                                  'num_heads >= 1, and a width divisible by 4'),
    ('model.decoder.width=30', 'a width divisible by 4 (its sin-cos table) and by num_heads'),
    ("data.crop_scale=('a', 'b')", 'config.data.crop_scale and config.data.crop_ratio need two values (lo, hi)'),
    ("data.std=(1.0, 'x', 1.0)", 'config.data.mean and config.data.std need three values, std > 0'),
    ("data.train_split=''", 'config.data.train_split is empty'),
    ("data.image_key=''", 'config.data.image_key is empty'),
    ("train.blr=float('inf')", 'config.train: blr > 0, min_lr >= 0, weight_decay >= 0, all finite'),
    ('train.min_lr=0.001', 'config.train.min_lr=0.001 is above the peak lr 0.000375 (blr * batch_size / 256)'),
    ("mesh.fsdp_min_size_mb=float('nan')", 'config.mesh.fsdp_min_size_mb=nan must be >= 0'),
    ("eval.knn_temperature=float('inf')", 'knn_temperature must be positive (and finite)'),
    ('eval.knn_bank_size=10', 'config.eval.knn_k=20 is more neighbours than the bank of knn_bank_size=10 images'),
])
def test_values_that_would_fail_late_or_silently_are_refused(override, message):
  config = config_lib.tiny_cpu_config()
  key, value = override.split('=', 1)
  *sections, field = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[field] = eval(value)  # pylint: disable=eval-used  # the literals above
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.validate(config)
  config_lib.validate(config_lib.tiny_cpu_config())  # the defaults pass
