"""Multi-host initialisation: one thin layer over `jax.distributed.initialize()` (MaxText's indirection).

Every process of a multi-host run calls `maybe_initialize()` before anything touches a device. Then
`jax.devices()` lists every device of the job, each process feeds only its own slice of the global batch
(`data/loader.py` slices by `jax.process_index()`, `sharding.global_batch` assembles the global array),
process 0 alone prints and writes logs, and orbax writes each checkpoint from all processes together.

When it initialises, in order:
  1. explicit `--coordinator_address` (with `--num_processes`, `--process_id`, optionally
     `--local_device_ids`): any cluster, including two processes on one machine;
  2. `MAE_JAX_DISTRIBUTED=1`: JAX's own auto-detection (Cloud TPU VMs and pod slices, SLURM, Open MPI,
     or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment); `launch/` sets it;
  3. `MAE_JAX_DISTRIBUTED` unset: auto-detection only where a multi-process launch is unambiguous (an
     `srun` step or `mpirun` with more than one task, TPU_WORKER_HOSTNAMES listing several hosts,
     MEGASCALE_COORDINATOR_ADDRESS or JAX_COORDINATOR_ADDRESS set); a single-host TPU VM or GPU machine
     needs no initialisation (on a GCE pod slice, whose workers may not have TPU_WORKER_HOSTNAMES in their
     environment, set MAE_JAX_DISTRIBUTED=1 as `launch/tpu_vm.sh` does);
  `MAE_JAX_DISTRIBUTED=0` turns it off.
With auto-detection under SLURM or Open MPI on GPUs, JAX gives each process the one GPU of its local rank
(one process per GPU); `launch/slurm.sh` passes explicit flags, so one process per node drives all its GPUs.
"""
import os
import sys

from absl import flags

ENV = 'MAE_JAX_DISTRIBUTED'

flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process runs without a '
                    'cluster JAX detects (e.g. 10.0.0.2:1234). Needs --num_processes and --process_id.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes).')
flags.DEFINE_list('local_device_ids', None, 'Restricts this process to these local accelerators (e.g. 0 with one '
                  'process per GPU); default: all.')
flags.DEFINE_integer('distributed_timeout', 300, 'Seconds to wait for every process to join.')


class DistributedError(RuntimeError):
  """Multi-process initialisation that cannot work; the message says what to set."""


def detected_launcher(environ=None):
  """The multi-process launcher found in the environment ('slurm', 'openmpi', 'tpu', 'env'), or None."""
  env = os.environ if environ is None else environ
  if int(env.get('SLURM_STEP_NUM_TASKS', '1') or 1) > 1 and 'SLURM_PROCID' in env:  # set by srun, per step
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'openmpi'
  if ',' in env.get('TPU_WORKER_HOSTNAMES', '') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu'  # a multi-host slice (GKE sets these) or a multi-slice job
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  return None


def plan(coordinator_address=None, num_processes=None, process_id=None, environ=None):
  """What `maybe_initialize` will do: 'explicit', 'auto' or None (single process); raises on a bad mix."""
  env = os.environ if environ is None else environ
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise DistributedError('--coordinator_address, --num_processes and --process_id go together; got '
                             f'{coordinator_address!r}, {num_processes!r}, {process_id!r}')
    if not 0 <= process_id < num_processes:
      raise DistributedError(f'--process_id={process_id} must be in [0, --num_processes={num_processes})')
    return 'explicit'
  setting = env.get(ENV, '').strip().lower()
  if setting in ('0', 'false', 'no', 'off'):
    return None
  if setting in ('1', 'true', 'yes', 'on'):
    return 'auto'
  if setting:
    raise DistributedError(f'{ENV}={env[ENV]!r}: use 1 (initialise, auto-detecting the cluster) or 0 (never)')
  return 'auto' if detected_launcher(env) else None


def maybe_initialize(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
                     timeout_s=300):
  """Joins the processes of a multi-host run (see the module docstring); a no-op on one process.

  Must run before any JAX computation or device query. Returns True when JAX's distributed system is
  initialised (now or before).
  """
  import jax  # importing jax does not start a backend; `jax.devices()` would

  if jax.distributed.is_initialized():
    return True
  how = plan(coordinator_address, num_processes, process_id)
  if how is None:
    return False
  # Cross-process collectives of CPU devices (tests, CPU clusters). gloo is JAX 0.10's default; set it
  # explicitly so a changed default cannot make multi-process CPU runs fail at their first all-reduce.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=timeout_s)
  if local_device_ids:
    kwargs['local_device_ids'] = [int(i) for i in local_device_ids]
  try:
    if how == 'explicit':
      # No auto-detection: under SLURM or Open MPI it would otherwise restrict each process to the one GPU
      # of its local rank, even with one process per node; explicit flags mean all local devices unless
      # --local_device_ids says otherwise.
      jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                 cluster_detection_method='deactivate', **kwargs)
    else:
      jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    raise DistributedError(
        f'jax.distributed.initialize() failed ({how}): {e}. On a cluster JAX cannot detect, pass '
        f'--coordinator_address=HOST:PORT --num_processes=N --process_id=I; set {ENV}=0 for one process.') from e
  return True


def initialize_from_flags():
  """`maybe_initialize` with the absl flags above (after flag parsing)."""
  f = flags.FLAGS
  return maybe_initialize(f.coordinator_address, f.num_processes, f.process_id, f.local_device_ids,
                          f.distributed_timeout)


def describe():
  """One line about this process's place in the job (for process 0's startup message)."""
  import jax
  return (f'process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local of '
          f'{jax.device_count()} {jax.devices()[0].platform} devices')


def log(message):
  """Prints on process 0 only."""
  import jax
  if jax.process_index() == 0:
    print(message, file=sys.stdout, flush=True)
