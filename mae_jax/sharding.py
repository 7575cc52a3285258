"""Device mesh from the config, and the shardings of the train state and the batch.

One mesh with axes ('data', 'fsdp') serves every scale: 1 CPU, 8 simulated devices, a GPU host, a pod.
Parameters and optimizer state are replicated over 'data' and, above a size threshold, sharded over
'fsdp' along their largest evenly divisible dimension (big_vision's fsdp rule). The batch is split over
both axes. Shardings are derived from abstract shapes, so the state is created already sharded.

Across TPU slices (or GPU nodes), `config.mesh.dcn_data` / `dcn_fsdp` say how much of each axis spans the
slow data-centre network: the mesh is then built with `create_hybrid_device_mesh`, so that only the axis
given to DCN (normally 'data': one gradient all-reduce per step) crosses slices, while FSDP's all-gathers
stay on the fast interconnect (ICI / NVLink).
"""
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ('data', 'fsdp')
BATCH_SPEC = P(AXES)


class MeshError(ValueError):
  pass


def mesh_shape(mesh_config, num_devices):
  """Resolves -1 in `config.mesh` to fill the devices; explains an impossible shape."""
  sizes = {axis: mesh_config[axis] for axis in AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if len(fill) > 1:
    raise MeshError(f'config.mesh: only one axis may be -1, got {sizes}')
  if fill:
    if num_devices % fixed:
      raise MeshError(f'config.mesh={sizes}: {num_devices} devices are not divisible by {fixed}')
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise MeshError(f'config.mesh={sizes} needs {math.prod(sizes.values())} devices, but {num_devices} are available')
  return tuple(sizes[axis] for axis in AXES)


def dcn_shape(mesh_config, shape):
  """The part of each mesh axis that spans slices (DCN); the rest, `shape // dcn`, is within a slice."""
  dcn = tuple(mesh_config.get(f'dcn_{axis}', 1) for axis in AXES)
  for axis, size, outer in zip(AXES, shape, dcn):
    if outer < 1 or size % outer:
      raise MeshError(f'config.mesh.dcn_{axis}={outer} must be >= 1 and divide config.mesh.{axis}={size}')
  return dcn


def granules(devices):
  """'slice' when the devices span several TPU slices, else 'process' (GPU nodes, CPU processes)."""
  slices = {getattr(d, 'slice_index', None) for d in devices}
  return 'slice' if None not in slices and len(slices) > 1 else 'process'


def create_mesh(mesh_config, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  dcn = dcn_shape(mesh_config, shape)
  if math.prod(dcn) == 1:
    device_array = mesh_utils.create_device_mesh(shape, devices)
  else:
    ici = tuple(size // outer for size, outer in zip(shape, dcn))
    try:
      device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                           process_is_granule=granules(devices) == 'process')
    except ValueError as e:
      raise MeshError(f'config.mesh: a hybrid mesh of {dcn} slices/processes x {ici} devices each does not fit '
                      f'these {len(devices)} devices: {e}') from None
  return Mesh(device_array, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def fsdp_spec(shape, itemsize, fsdp_size, min_size_mb):
  """Shards the largest dimension divisible by the fsdp axis, for arrays of at least `min_size_mb`."""
  if fsdp_size == 1 or math.prod(shape) * itemsize < min_size_mb * 2**20:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh, min_size_mb):
  fsdp_size = mesh.shape['fsdp']

  def sharding(leaf):
    return NamedSharding(mesh, fsdp_spec(leaf.shape, np.dtype(leaf.dtype).itemsize, fsdp_size, min_size_mb))

  return jax.tree.map(sharding, abstract_state)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, BATCH_SPEC)


def global_batch(local_batch, mesh):
  """Assembles the global jax.Array batch from each process's local NumPy slice."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
