"""Benchmark of the train step: step time, images/s, FLOP/s, per-device memory and MFU, measured.

  python -m mae_jax.bench --config=configs/mae_vitb.py [--steps=10] [--warmup=2] [--per_device_batch=N]
      [--compile_only] [--simulate_devices=8] [--compare=torch] [--asymmetry] [--profile=DIR]
      [--config.<field>=<value> ...]

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

Without `--per_device_batch`, a config whose batch does not fit one device (the memory analysis against the
accelerator's `bytes_limit`, or on CPU half the host's available RAM shared by its devices; 10% headroom) is
run at the largest per-device batch that fits, found by compiling a few batch sizes (nothing is allocated);
an explicit `--per_device_batch` that does not fit, or a model that does not fit at batch 1, is an error.
`MAE_JAX_BENCH_MEMORY_BYTES` sets the bytes per device instead (tests).

`--compare=torch` then times the same step in PyTorch (mae_jax/bench_torch.py says what it contains), in a
subprocess, and prints both images/s and their ratio. `--asymmetry` (MAE family) compiles and times the step
again with the encoder on every patch (none dropped; the decoder and the loss as configured), the compute of
the MAE paper's Table 2 baseline, and prints the ratios of step time and FLOPs. `--profile=DIR` traces the timed
steps once more and prints where the op time goes (mae_jax/bench_profile.py). docs/performance.md has figures.
"""
import functools
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import bench_profile, bench_torch, cli
from mae_jax import config as config_lib
from mae_jax import distributed

config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_integer('steps', 10, 'Timed steps (after the warm-up).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('per_device_batch', 0, 'If > 0, sets config.train.batch_size to this times the device '
                     'count (times config.train.grad_accum_steps); if 0, the config\'s batch, or the largest '
                     'that fits the device\'s memory.')
flags.DEFINE_bool('compile_only', False, 'Only compile and print FLOPs and memory; allocate and run nothing.')
flags.DEFINE_integer('simulate_devices', 0, 'If > 0, run on this many simulated CPU devices (for compile-only '
                     'memory checks of big meshes on a workstation).')
flags.DEFINE_enum('compare', None, ['torch'], 'Also time the same step in PyTorch (mae_jax/bench_torch.py) and '
                  'print both images/s and their ratio.')
flags.DEFINE_bool('asymmetry', False, 'MAE family: also compile and time the step with the encoder on every '
                  'patch, and print the ratios of step time and FLOPs (the MAE paper\'s Table 2).')
flags.DEFINE_string('profile', None, 'Also run the timed steps under jax.profiler.trace into this folder and print '
                    'where the op time goes, by module, pass and part (mae_jax/bench_profile.py).')
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
# The share of a device's memory a step may plan for: XLA's analysis leaves out the allocator's fragmentation
# and, on CPU, the memory of the process itself.
MEMORY_HEADROOM = 0.9
# On CPU, the share of the host's available RAM a step may take: other processes may grow while it runs, and a
# host out of memory kills the bench (the OOM killer) instead of refusing it.
HOST_SHARE = 0.5
MEMORY_ENV = 'MAE_JAX_BENCH_MEMORY_BYTES'  # bytes per device instead of the device's own figure (tests)


class BenchError(Exception):
  """A fault found while benchmarking: one `mae_jax.bench: error:` line, and `exit_code`."""

  def __init__(self, message, exit_code=1):
    super().__init__(message)
    self.exit_code = exit_code


def fail(message, exit_code=2):
  cli.fail('mae_jax.bench', message, exit_code)


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


@functools.cache  # once per process: --asymmetry's second run reads the same peak
def measure_matmul_flops(device, n=2048, repeats=20):
  """The best float32 FLOP/s of an n x n matmul on `device` (a CPU's practical peak; 20 tries of ~50 ms: a
  shared host's speed varies from one moment to the next)."""
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


def batch_shapes(batch_size, img_size):
  """The shapes and dtypes of a batch: the real loader's keys."""
  import numpy as np
  return {'image': ((batch_size, img_size, img_size, 3), np.float32), 'label': ((batch_size,), np.int32)}


class SyntheticLoader:
  """Random images of the configured shape (the real loader's local batches), without reading a dataset."""

  steps_per_epoch = 1000  # only shapes the learning-rate schedule

  def __init__(self, config, process_count):
    self.local_batch_size = config.train.batch_size // process_count
    self.img_size = config.data.img_size

  def local_batch(self, step):
    import numpy as np
    rng = np.random.default_rng(step)
    shapes = batch_shapes(self.local_batch_size, self.img_size)  # {key: (shape, dtype)}
    return {'image': rng.standard_normal(*shapes['image']), 'label': np.zeros(*shapes['label'])}

  def iterate(self, start_step, end_step, prefetch=0):
    for step in range(start_step, end_step):
      yield self.local_batch(step)


def abstract_batch(batch_size, img_size, mesh):
  """A global batch of `batch_size` images as shapes, laid out as the train step takes it (nothing allocated)."""
  import jax
  from mae_jax import sharding
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=spec)
          for k, (shape, dtype) in batch_shapes(batch_size, img_size).items()}


def build_trainer(config, every_token=False):
  """(the Trainer of `config` on synthetic batches, its loader, the config fields given random stand-ins);
  `every_token`: the encoder on every patch (`MAE.encode_every_patch`)."""
  import tempfile

  import jax

  from mae_jax import train
  loader = SyntheticLoader(config, jax.process_count())
  with tempfile.TemporaryDirectory(prefix='mae_jax_bench_') as folder:
    stand_ins = stand_in_frozen_networks(config, folder)
    trainer = train.Trainer(config, loader=loader)  # loads the frozen networks
  if every_token:  # an MAE-family objective (check_options)
    trainer.objective.encode_every_patch = True
  return trainer, loader, stand_ins


def compile_step(trainer, batch_size):
  """The train step compiled ahead of time for a global batch of `batch_size`, as training compiles it."""
  batch = abstract_batch(batch_size, trainer.config.data.img_size, trainer.mesh)
  return trainer.train_step.lower(trainer.abstract_state, batch).compile()


def timed_compile(trainer):
  start = time.perf_counter()
  compiled = compile_step(trainer, trainer.config.train.batch_size)
  return compiled, time.perf_counter() - start


def step_flops(trainer, config, compiled, every_token):
  """FLOPs per step per device. XLA's cost analysis counts a scanned loop body once, so with gradient
  accumulation the count comes from a one-micro-batch step, times the number of micro-batches."""
  accum = config.train.grad_accum_steps
  if accum == 1:
    return compiled.cost_analysis()['flops'], ''
  micro = config.copy_and_resolve_references()
  micro.train.batch_size //= accum
  micro.train.grad_accum_steps = 1
  micro_trainer, _, _ = build_trainer(micro, every_token)
  flops = compile_step(micro_trainer, micro.train.batch_size).cost_analysis()['flops']
  return accum * flops, f'; {accum} micro-batches x one micro-batch step'


def step_bytes(stats):
  """What must be live at once: inputs, outputs not aliased to inputs, scratch."""
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
          + stats.temp_size_in_bytes)


def memory_lines(compiled):
  stats = compiled.memory_analysis()
  if stats is None:
    return ['memory analysis          not available on this backend']
  return [f'memory per device        {size(step_bytes(stats))} = arguments {size(stats.argument_size_in_bytes)} + '
          f'outputs {size(stats.output_size_in_bytes)} - donated {size(stats.alias_size_in_bytes)} + temporaries '
          f'{size(stats.temp_size_in_bytes)} (XLA memory analysis)']


def host_available_bytes():
  """The host's available RAM: MemAvailable (free + reclaimable caches), else the free pages."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def device_memory(device):
  """(bytes one device holds, where the figure comes from), or (None, None) where unknown."""
  import jax
  if os.environ.get(MEMORY_ENV):
    try:
      return int(os.environ[MEMORY_ENV]), MEMORY_ENV
    except ValueError:
      raise BenchError(f'{MEMORY_ENV}={os.environ[MEMORY_ENV]!r} is not a number of bytes', 2) from None
  stats = device.memory_stats()
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'], f'{device.device_kind} bytes_limit'
  if device.platform == 'cpu':
    shared = jax.local_device_count()
    return (int(HOST_SHARE * host_available_bytes()) // shared,
            f'{HOST_SHARE:.0%} of the available RAM of this host / {shared} device(s)')
  return None, None


def largest_fitting_batch(bytes_at, limit, too_big, too_big_bytes):
  """(the largest per-device batch whose step needs at most `limit` bytes, 0 if not even 1; {batch: bytes}
  probed), knowing that batch `too_big` needs `too_big_bytes` > limit. Memory grows about linearly with the
  batch, so each probe is extrapolated from the largest batch known to fit along the line through the last two
  probes, within the bracket: a few compiles where halving would take a dozen."""
  known = {too_big: too_big_bytes}
  lo, hi, previous, probe = 0, too_big, too_big, 1
  while hi - lo > 1:
    known[probe] = bytes_at(probe)
    lo, hi = (probe, hi) if known[probe] <= limit else (lo, probe)
    if lo == 0:  # not even batch 1
      break
    slope = (known[probe] - known[previous]) / (probe - previous)
    previous, probe = probe, min(max(lo + int((limit - known[lo]) / slope), lo + 1), hi - 1)
  return lo, known


def fit_batch(config, trainer, compiled, fixed_by):
  """The lines saying so when the configured batch does not fit one device and a smaller one is chosen (then
  config.train.batch_size is lowered), [] when it fits or the memory is unknown. Raises BenchError when
  `fixed_by` (what set the batch) is not empty, or when even batch 1 does not fit."""
  import jax
  stats = compiled.memory_analysis()
  available, source = device_memory(jax.local_devices()[0])
  if stats is None or available is None:
    return []
  limit, needed = int(MEMORY_HEADROOM * available), step_bytes(stats)
  if needed <= limit:
    return []
  per_step = trainer.mesh.devices.size * config.train.grad_accum_steps  # global images per per-device image
  per_device = config.train.batch_size // per_step
  usable = f'{size(limit)} usable per device ({MEMORY_HEADROOM:.0%} of {size(available)}, {source})'
  if fixed_by:
    raise BenchError(f'{fixed_by}: the step at {per_device} per device needs {size(needed)} per device (XLA memory '
                     f'analysis), more than the {usable}; lower --per_device_batch', 2)
  best, known = largest_fitting_batch(lambda b: step_bytes(compile_step(trainer, b * per_step).memory_analysis()),
                                      limit, per_device, needed)
  if best == 0:
    raise BenchError(f'the step needs {size(known[1])} per device even at --per_device_batch=1 (XLA memory '
                     f'analysis), more than the {usable}; try --config.model.remat=True, '
                     '--config.model.dtype=bfloat16, or more devices with --config.mesh.fsdp')
  config.train.batch_size = best * per_step
  return [f'batch fit                the config\'s {per_device} per device needs {size(needed)}, more than the '
          f'{usable}: running {best} per device ({size(known[best])}), the largest that fits (XLA memory '
          f'analysis of {len(known) - 1} more compiles; --per_device_batch=N chooses)']


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


def run(config, steps, warmup, compile_only, fixed_by='', every_token=False, profile=None):
  """Compiles (and runs) the train step of `config`; prints and returns the figures as a dict. The batch is
  lowered to fit the device unless `fixed_by` names what set it; `every_token`: see `build_trainer`;
  `profile`: a folder for a trace of `steps` more steps, summarised (mae_jax/bench_profile.py)."""
  import jax
  import numpy as np

  from mae_jax import sharding
  from mae_jax.models import vit

  if config.train.num_steps <= 0:
    config.train.num_steps = max(steps + warmup, 1)
  trainer, loader, stand_ins = build_trainer(config, every_token)
  compiled, compile_s = timed_compile(trainer)
  fitted = [] if compile_only else fit_batch(config, trainer, compiled, fixed_by)
  if fitted:  # built again for the chosen batch (its learning rate and loader)
    trainer, loader, stand_ins = build_trainer(config, every_token)
    compiled, compile_s = timed_compile(trainer)
  mesh = trainer.mesh
  process_count = jax.process_count()
  flops, flops_note = step_flops(trainer, config, compiled, every_token)
  device = jax.local_devices()[0]  # this process's: peaks are measured on it
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state['params']))
  param_bytes = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                    for x, s in zip(jax.tree.leaves(trainer.abstract_state['params']),
                                    jax.tree.leaves(trainer.state_sharding['params'])))
  figures = dict(compile_s=compile_s, flops_per_device=flops, num_params=num_params, param_bytes=param_bytes,
                 memory=compiled.memory_analysis())
  lines = [
      f'model                    {config.objective} {config.model.variant} at {config.data.img_size} px, '
      f'{num_params / 1e6:.1f}M params, compute {vit.compute_dtype(config.model)} ({config.model.dtype}), remat '
      f'{config.model.remat and config.model.remat_policy or "off"}',
      f'devices                  {mesh.devices.size} x {device.device_kind} ({device.platform}), '
      f'{process_count} process(es), mesh {dict(mesh.shape)}',
      *fitted,
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
  distributed.log('\n'.join(lines))  # before the steps, which may take long
  if compile_only:
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
  lines = [
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
  if profile:
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      for _ in range(steps):
        state, metrics = compiled(state, batch, trainer.frozen)
        jax.block_until_ready(state)
    distributed.log('\n'.join(bench_profile.summarize(profile, compiled.as_text(), steps)))
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


def asymmetry_line(config, masked, full):
  """The cost of an encoder on every patch relative to the configured one's: FLOPs and (when timed) step time."""
  from mae_jax.models import masking, vit
  patches = (config.data.img_size // vit.parse_variant(config.model.variant)['patch_size']) ** 2
  kept = masking.num_kept(patches, config.mae.mask_ratio)
  ratios = [f'{full["flops_per_device"] / masked["flops_per_device"]:.2f}x the FLOPs']
  if 'step_s' in masked:
    ratios.append(f'{full["step_s"] / masked["step_s"]:.2f}x the step time')
  return (f'asymmetry                the encoder on all {patches} patches instead of {kept}: {", ".join(ratios)} '
          '(the MAE paper\'s Table 2: 2.8x (ViT-L) to 4.1x (ViT-H) in time, TPU v3)')


def compare_lines(config, figures, steps, warmup):
  """Times the step in PyTorch (mae_jax/bench_torch.py) and sets the two side by side."""
  import jax
  platform = jax.local_devices()[0].platform
  if platform not in ('cpu', 'gpu'):
    raise BenchError(f'--compare=torch runs PyTorch on the CPU or a CUDA GPU, not next to JAX on {platform}', 2)
  try:
    theirs = bench_torch.compare(config, steps, warmup, 'cuda' if platform == 'gpu' else 'cpu')
  except RuntimeError as e:
    raise BenchError(e) from None
  ours = figures['images_per_s']
  return [
      f'torch step               {theirs["step_s"] * 1e3:.1f} ms (median of {steps}; after {warmup} warm-up steps), '
      f'torch {theirs["torch"]}, {theirs["threads"]} threads, eager',
      f'torch params             {theirs["num_params"]:,} (jax: {figures["num_params"]:,})',
      f'torch loss               {theirs["first_loss"]:.4f} at the first step, {theirs["loss"]:.4f} at the last',
      f'compare                  jax {ours:.4g} img/s, torch {theirs["images_per_s"]:.4g} img/s, ratio '
      f'{ours / theirs["images_per_s"]:.3g}x (jax/torch)',
  ]


def check_options(config, f):
  """--compare and --asymmetry's own conditions, before anything is built."""
  from mae_jax import objectives
  for name in ('compare', 'profile'):
    if f[name].value and f.compile_only:
      fail(f'--{name} times steps: it does not work with --compile_only')
  reason = f.compare and bench_torch.unavailable(config)
  if reason:
    fail(reason)
  family = objectives.OBJECTIVES.get(config.objective)
  if f.asymmetry and not (config.task == 'pretrain' and family and issubclass(family, objectives.MAE)):
    fail(f'--asymmetry is for MAE-family pretraining (mae, gan_mae, mr_mae, mr_gan_mae), not objective '
         f'{config.objective!r} with config.task={config.task!r}')


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
  check_options(config, f)
  if f.profile and 'xla_cpu_enable_xprof_traceme' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true'  # CPU ops
  try:
    distributed.initialize_from_flags()
  except distributed.DistributedError as e:
    fail(e)
  import jax

  from mae_jax import sharding
  if f.per_device_batch > 0:
    config.train.batch_size = f.per_device_batch * jax.device_count() * config.train.grad_accum_steps
  try:
    figures = run(config, f.steps, f.warmup, f.compile_only, '--per_device_batch' if f.per_device_batch else '',
                  profile=f.profile)
    if f.compare:
      distributed.log('\n'.join(compare_lines(config, figures, f.steps, f.warmup)))
    if f.asymmetry:  # at the same batch
      distributed.log('asymmetry run            the same step, the encoder on every patch:')
      full = run(config, f.steps, f.warmup, f.compile_only, '--asymmetry (at the batch above)', every_token=True)
      distributed.log(asymmetry_line(config, figures, full))
  except (config_lib.ConfigError, sharding.MeshError) as e:
    fail(e)
  except BenchError as e:
    fail(e, e.exit_code)
  except jax.errors.JaxRuntimeError as e:  # out of memory although the analysis said it fits, a device fault
    fail(f'{cli.one_line(str(e).splitlines()[0])} (on CPU, other processes may have taken the memory; '
         'lower --per_device_batch)', 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('mae_jax.bench'))
