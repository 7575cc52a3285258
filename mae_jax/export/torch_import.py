"""PyTorch files -> JAX params: official MAE releases, our own exports, timm ViTs.

Files are read without running pickled code: `.safetensors`, or `torch.load(weights_only=True)`, which
only rebuilds tensors and plain containers (plus `argparse.Namespace`, the `args` entry of the
reference's training checkpoints). A file that needs anything else is refused.
"""
import argparse
import io
import logging
import pickle
import re

from etils import epath
import flax
import jax

from mae_jax import tasks
from mae_jax.export import engine, tables


class UnsafeFileError(ValueError):
  """The file needs arbitrary pickled code to load; we never run it."""


def _to_numpy(key, value):
  import torch  # pylint: disable=g-import-not-at-top
  if not isinstance(value, torch.Tensor):
    raise engine.ConversionError(f'{key}: a {type(value).__name__}, not a tensor')
  value = value.detach().cpu()
  return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def load_state_dict(path):
  """{key: np.ndarray} from a `.safetensors` or `.pth` file; `{'model': sd}` checkpoints are unwrapped."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  data = path.read_bytes()
  if path.suffix == '.safetensors':
    return {k: _to_numpy(k, v) for k, v in safetensors.torch.load(data).items()}
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    reason = f'it needs {found[1]}' if found else f'{type(e).__name__}: {str(e)[:200]}'
    raise UnsafeFileError(
        f'{path} is refused: loading it would run pickled code, not only rebuild tensors ({reason}). '
        'mae_jax reads .pth files with torch.load(weights_only=True) only. If you trust the file, re-save '
        'its tensors yourself, e.g. as .safetensors.') from None
  if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
    others = sorted(set(obj) - {'model'})
    if others:
      logging.info('%s: reading the weights in "model"; not model weights: %s', path, others)
    obj = obj['model']
  if not isinstance(obj, dict):
    raise engine.ConversionError(f'{path}: holds a {type(obj).__name__}, not a state_dict')
  return {k: _to_numpy(k, v) for k, v in obj.items()}


def import_state_dict(state_dict, config, fmt, allow_missing=(), ignore=()):
  """{torch key: array} in format `fmt` -> params for the model of `config` (see `engine.from_torch`)."""
  head = state_dict.get('head.bias')
  objective = tasks.create(config).build_model(head.shape[0] if head is not None else None)
  expected = jax.eval_shape(objective.init, jax.random.key(0))
  return engine.from_torch(state_dict, fmt, expected, tables.fixed_tables(objective), tuple(allow_missing),
                           tuple(ignore))


def import_file(in_path, out, config, fmt, allow_missing=(), ignore=()):
  """Reads a PyTorch file, converts it for `config`'s model and writes the params as msgpack to `out`."""
  params = import_state_dict(load_state_dict(in_path), config, fmt, allow_missing, ignore)
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(flax.serialization.msgpack_serialize(params))
  return params


def load_init_params(path):
  """The params written by `import_file` (`python -m mae_jax.export import`), for `config.init_from`.

  A nested dict of numpy arrays; after a partial import (e.g. an encoder-only release) it holds only what
  the file had, and the caller fills the rest from a fresh init.
  """
  path = epath.Path(path)
  if path.suffix in ('.pth', '.pt', '.safetensors'):
    raise ValueError(f'{path}: convert PyTorch files first: python -m mae_jax.export import --in={path} ...')
  return flax.serialization.msgpack_restore(path.read_bytes())
