"""`python -m mae_jax.bench`: the PyTorch comparison, the encoder asymmetry, and a default batch that fits.

Tiny configs at a small batch, one or two timed steps, each run in a subprocess as a user runs it.
"""
import re

import pytest

from conftest import run_cli


def tiny(name='mae_tiny_cpu'):
  return [f'--config=configs/{name}.py', '--config.train.batch_size=8', '--steps=1', '--warmup=0']


TINY = tiny()


def figure(pattern, stdout):
  match = re.search(pattern, stdout)
  assert match, f'{pattern!r} not in the output:\n{stdout[-3000:]}'
  return match.groups()


def one_error_line(result, exit_code, text):
  assert result.returncode == exit_code and 'Traceback' not in result.stderr, result.stderr[-3000:]
  [line] = [line for line in result.stderr.splitlines() if line.strip()]
  assert line.startswith('mae_jax.bench: error: ') and text in line, line


@pytest.mark.slow
def test_compare_torch_asymmetry_and_profile(tmp_path):
  stdout = run_cli('bench', *TINY, '--compare=torch', '--asymmetry', f'--profile={tmp_path}', check=True).stdout
  jax_ips, torch_ips, ratio = map(float, figure(r'compare +jax ([\d.]+) img/s, torch ([\d.]+) img/s, '
                                                r'ratio ([\d.]+)x \(jax/torch\)', stdout))
  assert ratio == pytest.approx(jax_ips / torch_ips, rel=0.01)
  # The same architecture: HF's ViTMAEForPreTraining has exactly our trainable params.
  torch_params, jax_params = figure(r'torch params +([\d,]+) \(jax: ([\d,]+)\)', stdout)
  assert torch_params == jax_params
  first, last = map(float, figure(r'torch loss +([\d.]+) at the first step, ([\d.]+) at the last', stdout))
  assert 0 < first < 10 and 0 < last < 10  # finite, and an MSE of normalised pixels
  flops, time = map(float, figure(r'encoder on all 64 patches instead of 16: ([\d.]+)x the FLOPs, ([\d.]+)x the '
                                  r'step time', stdout))
  assert flops > 1.5 and time > 0
  # The trace's op time, mapped back to the modules and passes of the step.
  total, = figure(r'profile +([\d.]+) ms of op time per step', stdout)
  parts = dict((name, float(ms)) for ms, name in re.findall(r'^ +([\d.]+) ms +[\d.]+%  (.+)$', stdout, re.M))
  for name in ('ViT forward linear', 'ViT backward linear', 'MAEDecoder backward attention core',
               'step optimizer, norms, other'):
    assert 0 < parts[name] < float(total), (name, parts)


@pytest.mark.slow
def test_compare_torch_gan_mae():
  stdout = run_cli('bench', *tiny('gan_mae_tiny_cpu'), '--compare=torch', check=True).stdout
  torch_params, jax_params = figure(r'torch params +([\d,]+) \(jax: ([\d,]+)\)', stdout)
  assert torch_params == jax_params  # the MAE's and the discriminator head's
  first, = figure(r'torch loss +([\d.]+) at the first step', stdout)
  assert 0 < float(first) < 100


@pytest.mark.slow
def test_default_batch_is_lowered_to_fit():
  # 8 images need about 20 MB on this config: 90% of 15 MB leaves room for about 5.
  result = run_cli('bench', *TINY, env={'MAE_JAX_BENCH_MEMORY_BYTES': 15_000_000}, check=True)
  best, = figure(r"batch fit +the config's 8 per device needs .*: running (\d+) per device", result.stdout)
  assert 1 < int(best) < 8
  assert figure(r'batch +(\d+) global', result.stdout) == (best,)
  assert re.search(r'step time +[\d.]+ ms', result.stdout)


@pytest.mark.slow
def test_batch_that_cannot_fit_is_one_error_line():
  tiny = {'MAE_JAX_BENCH_MEMORY_BYTES': 1_000_000}  # the state alone takes 4 MB
  one_error_line(run_cli('bench', *TINY, env=tiny), 1, 'even at --per_device_batch=1')
  one_error_line(run_cli('bench', *TINY, '--per_device_batch=8', env={'MAE_JAX_BENCH_MEMORY_BYTES': 15_000_000}),
                 2, '--per_device_batch: the step at 8 per device needs')


def test_option_errors_are_one_line():
  one_error_line(run_cli('bench', '--config=configs/vqgan_tiny_cpu.py', '--compare=torch'), 2,
                 "--compare=torch is not available for objective 'vqgan'")
  one_error_line(run_cli('bench', '--config=configs/mage_tiny_cpu.py', '--asymmetry'), 2,
                 "--asymmetry is for MAE-family pretraining")
  one_error_line(run_cli('bench', *TINY, '--profile=/tmp/never', '--compile_only'), 2,
                 '--profile times steps: it does not work with --compile_only')
