"""Benchmark of the train step: step time, images/s, FLOP/s, per-device memory and MFU, measured.

  python -m mae_jax.bench --config=configs/mae_vitb.py [--steps=10] [--warmup=2] [--per_device_batch=N]
      [--compile_only] [--simulate_devices=8] [--config.<field>=<value> ...]

The step is compiled ahead of time for the configured mesh (`train_step.lower(abstract state, abstract
batch).compile()`), exactly as training compiles it. FLOPs come from XLA's cost analysis of that executable
(per device, rematerialisation included), memory from its memory analysis (per device: arguments, outputs,
temporaries). Then the state is created sharded, and `--steps` real steps on synthetic batches of the
right shape are timed after `--warmup` steps. MFU = achieved FLOP/s per device / the device's peak:
the dense bf16 peak for TPUs and GPUs (`PEAK_TFLOPS`), and on CPU a measured float32 matmul peak of the
host shared by its (possibly simulated) devices.

`--compile_only` stops after compiling (no memory is allocated), so a big model can be checked on a
simulated mesh: `--simulate_devices=8` gives the CPU 8 devices, e.g. ViT-H/14 at 64 images per device on
fsdp=8. Such figures come from XLA:CPU, compiled with its memory-optimised scheduler (its default one
favours concurrency and ignores rematerialisation's savings); a TPU or GPU compiler lays memory out
differently, so they are estimates: confirm with the same command on one real device before a long run.

XLA counts a loop body once, so with `config.train.grad_accum_steps=k` the FLOPs are those of a
one-micro-batch step (compiled separately) times k.
"""
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import cli
from mae_jax import config as config_lib
from mae_jax import distributed

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps (after the warm-up).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('per_device_batch', 0, 'If > 0, sets config.train.batch_size to this times the device '
                     'count (times config.train.grad_accum_steps).')
flags.DEFINE_bool('compile_only', False, 'Only compile and print FLOPs and memory; allocate and run nothing.')
flags.DEFINE_integer('simulate_devices', 0, 'If > 0, run on this many simulated CPU devices (for compile-only '
                     'memory checks of big meshes on a workstation).')
flags.mark_flags_as_required(['config'])

# Dense bf16 peak TFLOP/s per JAX device, matched on `device.device_kind` (first match wins). TPU v2/v3
# expose each TensorCore as a device (half a chip); from v4 on, one device is a chip.
PEAK_TFLOPS = (
    ('TPU v2', 22.5),
    ('TPU v3', 61.5),
    ('TPU v4', 275.0),
    ('TPU v5 lite', 197.0),   # v5e
    ('TPU v5p', 459.0),
    ('TPU v5', 459.0),        # v5p reports 'TPU v5'
    ('TPU v6 lite', 918.0),   # v6e (Trillium)
    ('H100 PCIe', 756.0),
    ('H100', 989.0),          # SXM
    ('H200', 989.0),
    ('A100', 312.0),
)
GiB = 2**30
CPU_MEMORY_SCHEDULER = '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'


def fail(message):
  cli.fail('mae_jax.bench', message)


def device_peak_flops(device):
  """(peak FLOP/s of one device, where the figure comes from) or (None, reason)."""
  for kind, tflops in PEAK_TFLOPS:
    if kind.lower() in device.device_kind.lower():
      return tflops * 1e12, f'{kind} dense bf16 spec'
  if device.platform == 'cpu':
    import jax
    host = measure_matmul_flops(device)
    shared = jax.local_device_count()
    return host / shared, f'measured f32 matmul peak of this host, {flop(host, "/s")}, / {shared} device(s)'
  return None, f'unknown device kind {device.device_kind!r}: add it to PEAK_TFLOPS'


def measure_matmul_flops(device, n=2048, repeats=5):
  """The best float32 FLOP/s of an n x n matmul on `device` (a CPU's practical peak)."""
  import jax
  import jax.numpy as jnp
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


class SyntheticLoader:
  """Random images of the configured shape (the real loader's local batches), without reading a dataset."""

  steps_per_epoch = 1000  # only shapes the learning-rate schedule

  def __init__(self, config, process_count):
    self.local_batch_size = config.train.batch_size // process_count
    self.img_size = config.data.img_size

  def local_batch(self, step):
    import numpy as np
    rng = np.random.default_rng(step)
    return {'image': rng.standard_normal((self.local_batch_size, self.img_size, self.img_size, 3), np.float32),
            'label': np.zeros((self.local_batch_size,), np.int32)}

  def iterate(self, start_step, end_step, prefetch=0):
    for step in range(start_step, end_step):
      yield self.local_batch(step)


def abstract_batch(loader, mesh, process_count):
  import jax
  from mae_jax import sharding
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((v.shape[0] * process_count, *v.shape[1:]), v.dtype, sharding=spec)
          for k, v in loader.local_batch(0).items()}


def step_flops(trainer, config, compiled, loader, process_count):
  """FLOPs per step per device. XLA's cost analysis counts a scanned loop body once, so with gradient
  accumulation the count comes from a one-micro-batch step, times the number of micro-batches."""
  accum = config.train.grad_accum_steps
  if accum == 1:
    return compiled.cost_analysis()['flops'], ''
  from mae_jax import train
  micro = config.copy_and_resolve_references()
  micro.train.batch_size //= accum
  micro.train.grad_accum_steps = 1
  micro_trainer = train.Trainer(micro, devices=trainer.mesh.devices.flatten().tolist(),
                                loader=SyntheticLoader(micro, process_count))
  micro_loader = SyntheticLoader(micro, process_count)
  flops = micro_trainer.train_step.lower(micro_trainer.abstract_state,
                                         abstract_batch(micro_loader, micro_trainer.mesh, process_count)
                                         ).compile().cost_analysis()['flops']
  return accum * flops, f'; {accum} micro-batches x one micro-batch step'


def memory_lines(compiled):
  stats = compiled.memory_analysis()
  if stats is None:
    return ['memory analysis          not available on this backend']
  args, out, alias, temp = (stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                            stats.temp_size_in_bytes)
  total = args + out - alias + temp  # what must be live at once: inputs, outputs not aliased to inputs, scratch
  return [f'memory per device        {size(total)} = arguments {size(args)} + outputs {size(out)} - donated '
          f'{size(alias)} + temporaries {size(temp)} (XLA memory analysis)']


def flop(count, per=''):
  """1.234 TFLOP, 56.7 GFLOP/s, ..."""
  for unit, scale in (('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6)):
    if count >= scale:
      return f'{count / scale:.4g} {unit}FLOP{per}'
  return f'{count:.4g} FLOP{per}'


def size(num_bytes):
  return f'{num_bytes / GiB:.2f} GiB' if num_bytes >= GiB / 10 else f'{num_bytes / 2**20:.1f} MiB'


def stand_in_frozen_networks(config, folder):
  """Random weights, written to `folder`, for each frozen network (a tokenizer, a teacher) whose config field
  names no existing file: the step's time and memory do not depend on their values, so a paper config is
  benchmarked before its released networks are imported. Returns the fields replaced."""
  import flax
  import jax
  import numpy as np

  from mae_jax import frozen, tasks
  replaced = []
  for name, network in tasks.create(config).build_model().frozen_networks().items():
    if os.path.exists(frozen.config_value(config, network.field)):
      continue
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), network.abstract_params())
    path = os.path.join(folder, f'{name}.msgpack')
    with open(path, 'wb') as f:
      f.write(flax.serialization.msgpack_serialize({network.subtree: params} if network.subtree else params))
    section, _, field = network.field.rpartition('.')
    frozen.config_value(config, section)[field] = path
    replaced.append(f'config.{network.field}')
  return replaced


def run(config, steps, warmup, compile_only):
  """Compiles (and runs) the train step of `config`; prints and returns the figures as a dict."""
  import tempfile

  import jax
  import numpy as np

  from mae_jax import sharding, train

  if config.train.num_steps <= 0:
    config.train.num_steps = max(steps + warmup, 1)
  process_count = jax.process_count()
  loader = SyntheticLoader(config, process_count)
  with tempfile.TemporaryDirectory(prefix='mae_jax_bench_') as folder:
    stand_ins = stand_in_frozen_networks(config, folder)
    trainer = train.Trainer(config, loader=loader)  # loads the frozen networks
  mesh = trainer.mesh
  batch_spec = abstract_batch(loader, mesh, process_count)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(trainer.abstract_state, batch_spec).compile()
  compile_s = time.perf_counter() - start
  flops, flops_note = step_flops(trainer, config, compiled, loader, process_count)
  device = jax.local_devices()[0]  # this process's: peaks are measured on it
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state['params']))
  param_bytes = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                    for x, s in zip(jax.tree.leaves(trainer.abstract_state['params']),
                                    jax.tree.leaves(trainer.state_sharding['params'])))
  figures = dict(compile_s=compile_s, flops_per_device=flops, num_params=num_params, param_bytes=param_bytes,
                 memory=compiled.memory_analysis())
  lines = [
      f'model                    {config.objective} {config.model.variant} at {config.data.img_size} px, '
      f'{num_params / 1e6:.1f}M params, compute {config.model.dtype}, remat '
      f'{config.model.remat and config.model.remat_policy or "off"}',
      f'devices                  {mesh.devices.size} x {device.device_kind} ({device.platform}), '
      f'{process_count} process(es), mesh {dict(mesh.shape)}',
      f'batch                    {config.train.batch_size} global, '
      f'{config.train.batch_size // mesh.devices.size} per device'
      + (f' in {config.train.grad_accum_steps} micro-batches' if config.train.grad_accum_steps > 1 else ''),
      f'compile                  {compile_s:.1f} s',
      f'params per device        {size(param_bytes)} (float32; x3 with AdamW\'s moments)',
      *([f'frozen networks          random weights for {", ".join(stand_ins)} (no file; timing only)']
        if stand_ins else []),
      *memory_lines(compiled),
      f'FLOPs per step           {flop(flops)} per device, {flop(flops * mesh.devices.size)} in all '
      f'(XLA cost analysis{flops_note})',
  ]
  if compile_only:
    distributed.log('\n'.join(lines))
    return figures

  state = trainer.init_state()
  batch = sharding.global_batch(loader.local_batch(0), mesh)
  for _ in range(warmup):
    state, metrics = compiled(state, batch, trainer.frozen)
  jax.block_until_ready(state)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, trainer.frozen)
    jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - start)
  jax.block_until_ready(state)
  step_s = float(np.median(times))
  achieved = flops / step_s
  peak, peak_source = device_peak_flops(device)
  figures.update(step_s=step_s, images_per_s=config.train.batch_size / step_s, flops_per_s_per_device=achieved,
                 peak_flops_per_device=peak, mfu=achieved / peak if peak else None,
                 loss=float(metrics['loss']))
  lines += [
      f'step time                {step_s * 1e3:.1f} ms (median of {steps}; min {min(times) * 1e3:.1f}, '
      f'max {max(times) * 1e3:.1f}; after {warmup} warm-up steps)',
      f'throughput               {figures["images_per_s"]:.1f} images/s, '
      f'{figures["images_per_s"] / mesh.devices.size:.2f} per device',
      f'achieved                 {flop(achieved, "/s")} per device, {flop(achieved * mesh.devices.size, "/s")} '
      f'in all',
      (f'MFU                      {100 * figures["mfu"]:.1f}% of {flop(peak, "/s")} per device ({peak_source})'
       if peak else f'MFU                      n/a: {peak_source}'),
      f'loss                     {figures["loss"]:.4f} (finite: {np.isfinite(figures["loss"])})',
      *frozen_cost_lines(trainer, batch, steps, step_s, figures),
  ]
  distributed.log('\n'.join(lines))
  return figures


def frozen_cost_lines(trainer, batch, steps, step_s, figures):
  """What each frozen network's own pass costs within the step (`Objective.frozen_forwards`: a teacher's forward
  on the batch), compiled and timed alone; its share of the step time is an upper bound (XLA overlaps work)."""
  import jax
  import numpy as np
  lines = []
  for name, forward in trainer.objective.frozen_forwards().items():
    compiled = jax.jit(forward).lower(trainer.frozen, batch['image']).compile()
    jax.block_until_ready(compiled(trainer.frozen, batch['image']))
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      jax.block_until_ready(compiled(trainer.frozen, batch['image']))
      times.append(time.perf_counter() - start)
    seconds, flops = float(np.median(times)), compiled.cost_analysis()['flops']
    figures[f'frozen/{name}'] = dict(s=seconds, flops_per_device=flops)
    lines.append(f'{name + " forward":<25}{seconds * 1e3:.1f} ms ({100 * seconds / step_s:.0f}% of the step), '
                 f'{flop(flops)} per device')
  return lines


def main(argv):
  del argv  # the flags parser refuses positional arguments
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = f.config
  for name in ('steps', 'warmup', 'per_device_batch', 'simulate_devices'):
    if f[name].value < (1 if name == 'steps' else 0):
      fail(f'--{name}={f[name].value} must be >= {1 if name == "steps" else 0}')
  if f.simulate_devices > 0:  # before anything starts a backend
    import jax
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_num_cpu_devices', f.simulate_devices)
    if f.compile_only and 'xla_cpu_scheduler_type' not in os.environ.get('XLA_FLAGS', ''):
      # XLA:CPU's default scheduler maximises concurrency and keeps rematerialised activations alive;
      # TPU and GPU schedulers minimise memory, so the memory-optimised one gives comparable figures.
      os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' ' + CPU_MEMORY_SCHEDULER
  try:
    distributed.initialize_from_flags()
  except distributed.DistributedError as e:
    fail(e)
  import jax

  from mae_jax import sharding
  if f.per_device_batch > 0:
    config.train.batch_size = f.per_device_batch * jax.device_count() * config.train.grad_accum_steps
  try:
    run(config, f.steps, f.warmup, f.compile_only)
  except (config_lib.ConfigError, sharding.MeshError) as e:
    fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('mae_jax.bench'))
