"""Sharding: the mesh and FSDP rules, and the same training on every mesh of 8 simulated CPU devices.

The multi-device part runs this file as a script in a subprocess with 8 CPU devices (see conftest.py):
  python tests/test_sharding.py meshes
"""
import json
import os
import re
import sys
from types import SimpleNamespace

import ml_collections
import numpy as np
import pytest
from conftest import run_cli, run_worker

from mae_jax import sharding

STEPS = 5
MESHES = {'1 device': (1, 1, 1), 'data=8': (8, 1, 8), 'fsdp=8': (1, 8, 8), 'data=2 x fsdp=4': (2, 4, 8)}
# Every other objective (with its frozen networks) and every downstream task on the three meshes that matter most.
RUNS = ('gan_mae', 'mimic_mae', 'mage', 'mr_mae', 'convmae', 'mr_mcmae', 'finetune', 'linprobe')
TASKS = ('finetune', 'linprobe')
# Objectives run from a tiny config of their own (MAGE: its tokenizer; MR-MAE: a random teacher for the MAE demo's).
CONFIG_RUNS = {'mage': 'mage_tiny_cpu', 'mr_mae': 'mr_mae_tiny_cpu', 'convmae': 'convmae_tiny_cpu',
               'mr_mcmae': 'mr_mcmae_tiny_cpu'}
RUN_MESHES = ('1 device', 'data=8', 'fsdp=8')


# ---- pure rules, no devices ----

@pytest.mark.parametrize('shape, itemsize, fsdp, min_mb, expected', [
    ((768, 3072), 4, 8, 4.0, (None, 'fsdp')),       # 9 MiB: the largest divisible dim
    ((3072, 768), 4, 8, 4.0, ('fsdp', None)),
    ((768, 768), 4, 8, 4.0, ()),                    # 2.25 MiB: under the threshold, replicated
    ((768, 768), 4, 8, 0.0, ('fsdp', None)),        # ties: the first largest dim
    ((1, 1, 64), 4, 8, 0.0, (None, None, 'fsdp')),
    ((999, 1001), 4, 8, 0.0, ()),                   # nothing divisible: replicated
    ((1028, 1000), 4, 8, 0.0, (None, 'fsdp')),      # the largest dim does not divide: the next one
    ((4096, 4096), 4, 1, 0.0, ()),                  # no fsdp axis
])
def test_fsdp_spec(shape, itemsize, fsdp, min_mb, expected):
  assert tuple(sharding.fsdp_spec(shape, itemsize, fsdp, min_mb)) == expected


def mesh_config(**kw):
  return ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'fsdp_min_size_mb': 4.0, 'dcn_data': 1, 'dcn_fsdp': 1,
                                    **kw})


def test_mesh_shape_fills_and_explains():
  assert sharding.mesh_shape(mesh_config(), 8) == (8, 1)
  assert sharding.mesh_shape(mesh_config(data=1, fsdp=-1), 8) == (1, 8)
  assert sharding.mesh_shape(mesh_config(data=2, fsdp=-1), 8) == (2, 4)
  with pytest.raises(sharding.MeshError, match='only one axis may be -1'):
    sharding.mesh_shape(mesh_config(data=-1, fsdp=-1), 8)
  with pytest.raises(sharding.MeshError, match='not divisible by 3'):
    sharding.mesh_shape(mesh_config(data=-1, fsdp=3), 8)
  with pytest.raises(sharding.MeshError, match='needs 4 devices, but 8'):
    sharding.mesh_shape(mesh_config(data=2, fsdp=2), 8)


def test_dcn_shape():
  assert sharding.dcn_shape(mesh_config(dcn_data=2), (4, 2)) == (2, 1)
  with pytest.raises(sharding.MeshError, match='dcn_data=3 must be >= 1 and divide config.mesh.data=4'):
    sharding.dcn_shape(mesh_config(dcn_data=3), (4, 2))


def test_granules_are_slices_only_across_several():
  dev = lambda slice_index, process: SimpleNamespace(slice_index=slice_index, process_index=process)
  assert sharding.granules([dev(0, 0), dev(1, 1)]) == 'slice'
  assert sharding.granules([dev(0, 0), dev(0, 1)]) == 'process'   # one slice: GPU nodes are processes
  assert sharding.granules([SimpleNamespace(process_index=0)]) == 'process'


def test_hybrid_mesh_needs_one_granule_per_dcn_index():
  import jax  # the pytest process's devices, all of one process
  config = mesh_config(data=2 * len(jax.devices()), dcn_data=2)
  with pytest.raises(sharding.MeshError, match='hybrid mesh'):
    sharding.create_mesh(config, jax.devices() * 2)


# ---- 8 simulated devices, in a subprocess ----

@pytest.fixture(scope='module')
def mesh_results():
  """One subprocess with 8 CPU devices trains the tiny config on every mesh (and once in bfloat16), and every
  other objective (frozen networks included) and downstream task on three of them."""
  return run_worker(__file__, 'meshes', num_devices=8, timeout=900)


@pytest.mark.slow
@pytest.mark.multidevice
def test_every_mesh_trains_the_same(mesh_results):
  results = mesh_results
  reference = np.array(results['1 device']['losses'])
  assert reference.shape == (STEPS,) and np.all(np.isfinite(reference))
  assert reference[-1] < reference[0]
  for name in MESHES:
    got = results[name]
    np.testing.assert_allclose(got['losses'], reference, rtol=0, atol=1e-5, err_msg=name)
    assert got['created_sharded'] and got['kept_sharding'], name
  # FSDP really shards: every parameter of the tiny model is split over 'fsdp' (threshold 0) ...
  assert all('fsdp' in spec for spec in results['fsdp=8']['specs'].values())
  assert all('fsdp' not in spec for spec in results['data=8']['specs'].values())
  assert results['fsdp=8']['specs']['encoder/blocks_0/mlp/fc1/kernel'] in ("P(None, 'fsdp')", "P('fsdp', None)")
  # ... so each device holds 1/8 of the parameters (1/4 on data=2 x fsdp=4), the replicated meshes all of them.
  full = results['1 device']['param_bytes_per_device']
  assert results['data=8']['param_bytes_per_device'] == full
  assert results['fsdp=8']['param_bytes_per_device'] == pytest.approx(full / 8, rel=0.01)
  assert results['data=2 x fsdp=4']['param_bytes_per_device'] == pytest.approx(full / 4, rel=0.01)
  # The optimizer moments follow the parameters.
  assert results['fsdp=8']['opt_bytes_per_device'] == pytest.approx(results['1 device']['opt_bytes_per_device'] / 8,
                                                                     rel=0.01)


@pytest.mark.slow
@pytest.mark.multidevice
@pytest.mark.parametrize('run', RUNS)
def test_every_objective_and_task_trains_the_same_on_every_mesh(mesh_results, run):
  runs = mesh_results['runs'][run]
  reference = np.array(runs['1 device']['losses'])
  assert np.all(np.isfinite(reference))
  assert run in TASKS or reference[-1] < reference[0]  # mixup makes 5 fine-tuning losses too noisy to order
  for name in RUN_MESHES:
    np.testing.assert_allclose(runs[name]['losses'], reference, rtol=0, atol=1e-5, err_msg=f'{run} {name}')
    assert runs[name]['created_sharded'] and runs[name]['kept_sharding']
  if run in ('mimic_mae', 'mr_mae'):  # the frozen teacher is placed by the same FSDP rule as the train state
    assert all('fsdp' in spec for spec in runs['fsdp=8']['frozen_specs'].values())
    assert all('fsdp' not in spec for spec in runs['data=8']['frozen_specs'].values())


@pytest.mark.slow
@pytest.mark.multidevice
def test_bfloat16_compute_keeps_float32_master_weights(mesh_results):
  result = mesh_results['bfloat16']
  assert result['param_dtypes'] == ['float32'] and result['opt_dtypes'] == ['float32']
  assert result['bf16_dots'] > 0  # the matmuls run in bfloat16
  losses = np.array(result['losses'])
  assert np.all(np.isfinite(losses))
  # The same training up to bfloat16 rounding.
  np.testing.assert_allclose(losses, mesh_results['1 device']['losses'], rtol=0.03)


def bench_figures(out, label, pattern):
  """The numbers of the bench line `label`, matched by `pattern` (FLOP figures as numbers: '1.2 GFLOP' -> 1.2e9)."""
  flop = r'([\d.]+ [MGTP]?)FLOP'
  match = re.search(r'^' + label + r' +' + pattern.replace('FLOP', flop), out, re.MULTILINE)
  assert match, f'{label} {pattern!r} not in the output:\n{out}'
  scale = {'M': 1e6, 'G': 1e9, 'T': 1e12, 'P': 1e15}
  return [float(x[:-1]) * scale.get(x[-1], 1) if x.endswith(tuple(scale)) else float(x) for x in match.groups()]


@pytest.mark.slow
@pytest.mark.multidevice
def test_bench_times_real_steps_and_its_figures_agree():
  out = run_cli('bench', '--config=configs/mae_tiny_cpu.py', '--steps=2', '--warmup=1', '--config.model.variant=pico/4',
                '--config.mesh.data=2', '--config.mesh.fsdp=4', '--config.mesh.fsdp_min_size_mb=0',
                '--simulate_devices=8', timeout=300, check=True).stdout
  assert "mesh {'data': 2, 'fsdp': 4}" in out and 'memory per device' in out and 'finite: True' in out, out
  # Figures that only timed steps give (the MFU line of the measured branch, not 'MFU n/a'), printed rounded
  # (4 significant digits, 0.1 ms, 0.1 images/s, 0.1 %): they must agree with each other up to that rounding.
  (batch,) = bench_figures(out, 'batch', r'(\d+) global')
  (flops,) = bench_figures(out, 'FLOPs per step', r'FLOP per device')
  (step_ms,) = bench_figures(out, 'step time', r'([\d.]+) ms \(median of 2;')
  (images_per_s,) = bench_figures(out, 'throughput', r'([\d.]+) images/s')
  (achieved,) = bench_figures(out, 'achieved', r'FLOP/s per device')
  mfu, peak = bench_figures(out, 'MFU', r'([\d.]+)% of FLOP/s per device')
  assert batch == 64 and flops > 0 and step_ms > 0 and achieved > 0 and peak > 0 and 0 <= mfu < 100, out
  r = 5e-4  # the relative rounding of 4 significant digits
  slowest, fastest = (step_ms + 0.05) / 1e3, max(step_ms - 0.05, 1e-3) / 1e3
  assert flops * (1 - r) / slowest <= achieved * (1 + r) and achieved * (1 - r) <= flops * (1 + r) / fastest, out
  assert batch / slowest - 0.05 <= images_per_s <= batch / fastest + 0.05, out
  assert abs(mfu - 100 * achieved / peak) <= 0.05 + 100 * achieved / peak * 2 * r, out


# ---- the subprocess side ----

def tiny_config(data, fsdp, **overrides):
  from configs import mae_tiny_cpu
  c = mae_tiny_cpu.get_config()
  c.mesh.update(data=data, fsdp=fsdp, fsdp_min_size_mb=0)
  c.train.num_steps = STEPS
  c.data.eval_split = ''
  for key, value in overrides.items():
    section, field = key.split('__')
    c[section][field] = value
  return c


def per_device_bytes(tree):
  import jax
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def run_config(run, data, fsdp, teacher_file):
  """The tiny config of `run`: an objective's pretraining, or a downstream task (with its own config file)."""
  import mimic_objective
  if run in TASKS or run in CONFIG_RUNS:
    import importlib
    c = importlib.import_module(f'configs.{CONFIG_RUNS.get(run, f"{run}_mae_tiny_cpu")}').get_config()
    c.mesh.update(data=data, fsdp=fsdp, fsdp_min_size_mb=0)
    c.train.num_steps = STEPS
    if c.objective == 'mr_mae':  # MR-MAE and MR-MCMAE
      from test_mr_mae import write_teacher
      c.mr_mae.teachers.mae.init_from = write_teacher(f'{teacher_file}.mr_mae', 'vit', 'nano/4', c.data.img_size)
    return c
  c = tiny_config(data, fsdp)
  c.objective = run
  c.mae.norm_pix_loss = False  # GAN-MAE needs pixel targets
  if run == 'mimic_mae':
    c.mimic_mae.teacher = teacher_file
    mimic_objective.write_teacher(teacher_file, img_size=c.data.img_size)
  return c


def specs(tree):
  import jax
  return {jax.tree_util.keystr(path, simple=True, separator='/'): str(x.sharding.spec)
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def train_run(config, num_devices):
  """Trains `config` on the first `num_devices` devices; returns the figures the tests check."""
  import jax
  from mae_jax import train
  trainer = train.Trainer(config, devices=jax.devices()[:num_devices])
  state = trainer.init_state()
  same = lambda tree: all(x.sharding == s for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(trainer.state_sharding)))
  created_sharded = same(state)
  out = {'param_bytes_per_device': per_device_bytes(state['params']),
         'opt_bytes_per_device': per_device_bytes(state['opt_state']),
         'specs': specs(state['params']), 'frozen_specs': specs(trainer.frozen)}
  losses = []
  for local_batch in trainer.loader.iterate(0, STEPS, prefetch=0):
    state, metrics = trainer.train_step(state, sharding.global_batch(local_batch, trainer.mesh))
    losses.append(float(metrics['loss']))
  out.update(losses=losses, created_sharded=created_sharded, kept_sharding=same(state), trainer=trainer, state=state)
  return out


def worker_meshes():
  results = {}
  for name, (data, fsdp, devices) in MESHES.items():
    out = train_run(tiny_config(data, fsdp), devices)
    del out['trainer'], out['state']
    results[name] = out
  results['bfloat16'] = bfloat16_run()
  import tempfile

  import mimic_objective
  mimic_objective.register()
  teacher_file = os.path.join(tempfile.mkdtemp(), 'teacher.msgpack')
  results['runs'] = {}
  for run in RUNS:
    runs = {}
    for name in RUN_MESHES:
      data, fsdp, devices = MESHES[name]
      out = train_run(run_config(run, data, fsdp, teacher_file), devices)
      del out['trainer'], out['state']
      runs[name] = out
    results['runs'][run] = runs
  return results


def bfloat16_run():
  import jax
  run = train_run(tiny_config(1, 1, model__dtype='bfloat16'), 1)
  trainer, state = run['trainer'], run['state']
  hlo = trainer.train_step.lower(trainer.abstract_state, {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(trainer.mesh))
      for k, v in next(trainer.loader.iterate(0, 1, 0)).items()}).as_text()
  bf16_dots = sum(1 for line in hlo.splitlines() if 'dot_general' in line and 'xbf16>' in line)
  return {'losses': run['losses'], 'bf16_dots': bf16_dots,
          'param_dtypes': sorted({str(x.dtype) for x in jax.tree.leaves(state['params'])}),
          'opt_dtypes': sorted({str(x.dtype) for x in jax.tree.leaves(state['opt_state']) if x.ndim})}


if __name__ == '__main__':
  import jax
  assert len(jax.devices()) == 8, jax.devices()
  print(json.dumps({'meshes': worker_meshes}[sys.argv[1]]()), flush=True)
