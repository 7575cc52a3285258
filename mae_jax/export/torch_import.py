"""PyTorch files -> JAX params: official MAE releases, our own exports, timm ViTs, MAGE's tokenizer.

Files are read without running pickled code: `.safetensors`, or `torch.load(weights_only=True)` (`.pth`, `.pt`,
`.ckpt`), which only rebuilds tensors and plain containers (plus `argparse.Namespace`, the `args` entry of the
reference's training checkpoints). A file that needs anything else is refused, with the command that converts
it once where it is trusted. What a file is comes from its first bytes, not its name; one that is none of
these (empty, cut short, corrupt, an HTML page, ...) is named as such. `{'model': sd}` (the reference's) and
`{'state_dict': sd}` (pytorch-lightning's `.ckpt`) checkpoints are unwrapped.

The tensors become float32 weights (`import_state_dict`), by dtype:
  float32            as stored.
  float16, bfloat16  converted exactly, with a note. A fixed sin-cos position table stored so is checked to
                     that precision (the model recomputes it in float32; a learned table is converted).
  float64            rounded to float32, with a note.
  integer, bool      an error naming the key, as no weight is one; index buffers (`INDEX_BUFFERS`, e.g. HF's
                     `position_ids`) are skipped with a note, and --ignore skips any key.
  anything else      (float8, complex, quantized) refused, naming the key.
A NaN or Inf in a weight is an error naming the key and how many values.
"""
import argparse
import fnmatch
import io
import logging
import math
import pickle
import re
import sys
import zipfile

from etils import epath
import flax
import jax
import ml_dtypes
import numpy as np

from mae_jax import tasks
from mae_jax.config import ConfigError
from mae_jax.export import engine, tables
from mae_jax.models.vit import posemb_sincos_2d

TORCH_SUFFIXES = ('.pth', '.pt', '.ckpt', '.bin', '.safetensors')
WRAPPERS = ('model', 'state_dict')  # the reference's checkpoints; pytorch-lightning's
INDEX_BUFFERS = ('position_ids', 'num_batches_tracked', 'relative_position_index')  # integer, derived, no weight
HALF = (np.float16, ml_dtypes.bfloat16)


class UnsafeFileError(ValueError):
  """The file needs arbitrary pickled code to load; we never run it."""


class UnreadableFileError(ValueError):
  """Not a PyTorch or safetensors file (another format, truncated, corrupt), or not a state_dict of tensors."""


def _file_kind(data):
  """'zip' (torch.save), 'pickle' (torch.save's legacy format), 'safetensors' or None, by the first bytes."""
  if data.startswith(b'PK\x03\x04'):
    return 'zip'
  if data[:1] == b'\x80' and data[1:2] and 2 <= data[1] <= 5:  # the PROTO opcode of pickle protocols 2-5
    return 'pickle'
  if data[8:9] == b'{':  # a little-endian u64 header size, then the JSON header
    return 'safetensors'
  return None


def _first_line(error):
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _listing(title, problems, limit=40):
  """One message: the title, then a line per problem (the first `limit`), as the engine's errors read."""
  more = [f'... and {len(problems) - limit} more'] if len(problems) > limit else []
  return '\n  '.join([title] + problems[:limit] + more)


def _missing_global(name):
  """Whether `name` (module.attr) is not there in an already imported module: the file's name for it is cut
  short or garbled (a damaged file), not code it asks to run. Imports nothing."""
  module, _, attr = name.rpartition('.')
  return module in sys.modules and not hasattr(sys.modules[module], attr)


def _conversion_command(path):
  target = str(epath.Path(path).with_suffix('.safetensors'))
  return ('python -c "import torch, safetensors.torch as st; '
          f'c = torch.load({str(path)!r}, map_location=\'cpu\', weights_only=False); '
          "sd = c.get('state_dict', c.get('model', c)); "
          f'st.save_file({{k: v.contiguous() for k, v in sd.items()}}, {target!r})"')


def _torch_load(path, data, kind):
  import torch  # pylint: disable=g-import-not-at-top
  if kind == 'zip':
    try:
      names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
      raise UnreadableFileError(f'{path} is a damaged torch.save archive: its zip directory is missing or unreadable '
                                '(truncated or corrupt); copy or download it again') from None
    if any(name.endswith('/constants.pkl') for name in names):  # torch.jit.save's, not torch.save's
      raise UnsafeFileError(
          f'{path} is a TorchScript archive (e.g. OpenAI CLIP\'s ViT-B-16.pt): loading it runs its code, which '
          'mae_jax never does. Import the same weights from a state dict instead: HF openai/clip-vit-base-patch16 '
          "model.safetensors (--format=clip-hf), or, where the file is trusted, convert it once with "
          "`python -c \"import clip, torch; m, _ = clip.load('ViT-B-16.pt', device='cpu', jit=False); "
          "torch.save(m.state_dict(), 'clip_vitb16.pth')\"` and import that (--format=clip-openai)")
    if not any(name.endswith('/data.pkl') for name in names):
      raise UnreadableFileError(f'{path} is a zip archive but not a torch.save file (no data.pkl among '
                                f'{names[:5]})')
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    found = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
    if found and not _missing_global(found[1]):
      raise UnsafeFileError(
          f'{path} is refused: loading it would run pickled code, not only rebuild tensors (it needs {found[1]}). '
          'mae_jax reads PyTorch files with torch.load(weights_only=True) only. If you trust the file, convert its '
          f'weights once and import the .safetensors file: {_conversion_command(path)}') from None
    detail = re.search(r'WeightsUnpickler error: (.+)', str(e))
    reason = f'it names {found[1]}, which does not exist' if found else detail[1] if detail else 'not a valid pickle'
    raise UnreadableFileError(f'{path} is a damaged torch.save file (truncated or corrupt: {reason})') from None
  except Exception as e:  # pylint: disable=broad-except  # torch's reader fails in many ways on a damaged file
    raise UnreadableFileError(f'{path} is a damaged torch.save file (truncated or corrupt: {type(e).__name__}: '
                              f'{_first_line(e)})') from None


def _to_numpy(value):
  """A tensor's values in its own dtype (bfloat16 as ml_dtypes'), or None for a dtype no weight can have."""
  import torch  # pylint: disable=g-import-not-at-top
  value = value.detach().cpu()
  if value.dtype == torch.bfloat16:
    return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  exotic = value.dtype.is_floating_point or value.dtype.is_complex or value.is_quantized  # float8, complex, qint8
  if value.dtype in (torch.float16, torch.float32, torch.float64) or not exotic:
    return value.numpy()
  return None


def load_state_dict(path):
  """{key: np.ndarray in the file's dtype} from a PyTorch or safetensors file (see the module docstring)."""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  data = path.read_bytes()
  if not data:
    raise UnreadableFileError(f'{path} is empty (0 bytes): not a PyTorch or safetensors file; copy or download it '
                              'again')
  kind = _file_kind(data)
  if kind is None:
    raise UnreadableFileError(
        f'{path} is not a PyTorch or safetensors file (truncated, corrupt, or not a checkpoint at all): its first '
        f'bytes {data[:16]!r} begin neither a torch.save archive nor a safetensors header')
  if kind == 'safetensors':
    try:
      obj = safetensors.torch.load(data)
    except safetensors.SafetensorError as e:
      raise UnreadableFileError(
          f'{path} is a damaged safetensors file (truncated or corrupt: {_first_line(e)})') from None
  else:
    obj = _torch_load(path, data, kind)
  if isinstance(obj, dict):
    wrapper = next((key for key in WRAPPERS if isinstance(obj.get(key), dict)), None)
    if wrapper:
      others = sorted(map(str, set(obj) - {wrapper}))
      if others:
        logging.info('%s: reading the weights in %r; not model weights: %s', path, wrapper, others)
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise UnreadableFileError(f'{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)')
  if not any(isinstance(v, torch.Tensor) for v in obj.values()):
    raise UnreadableFileError(f'{path} holds no tensors: not a state_dict, and no {" or ".join(WRAPPERS)} entry '
                              f'holding one (its entries: {sorted(map(str, obj))[:10]})')
  out, problems = {}, []
  for key, value in obj.items():
    array = _to_numpy(value) if isinstance(value, torch.Tensor) else None
    if array is None:
      what = f'a {value.dtype} tensor' if isinstance(value, torch.Tensor) else f'a {type(value).__name__}'
      problems.append(f'{key}: {what}, not a weight')
    else:
      out[key] = array
  if problems:
    raise UnreadableFileError(_listing(f'{path}: entries that are not weights (float or integer tensors):', problems))
  return out


def _fixed_table_keys(fmt, objective):
  """{torch key: width} of the position tables that are fixed sin-cos constants in the model."""
  fixed = tables.fixed_tables(objective)
  return {torch: fixed[jax].shape[-1] for jax, torch, kind in tables.FORMATS[fmt]
          if kind in tables.POSITION_KINDS and jax in fixed}


def _sincos_at_precision(value, width):
  """The float32 sin-cos table that `value` (half precision) rounds, or None if it is another table."""
  if value.ndim != 3 or value.shape[0] != 1 or value.shape[-1] != width or value.shape[1] < 1:
    return None
  length = value.shape[1]
  cls_token = math.isqrt(length) ** 2 != length  # a square grid with or without a cls row (ConvMAE has none)
  side = math.isqrt(length - cls_token)
  if side * side != length - cls_token:
    return None
  own = posemb_sincos_2d(width, (side, side), cls_token)[None].astype(np.float32)
  tolerance = engine.SINCOS_ATOL + float(ml_dtypes.finfo(value.dtype).eps) * np.abs(own)  # one unit in the last place
  return own if np.all(np.abs(value.astype(np.float32) - own) <= tolerance) else None


def _float_weights(state_dict, fixed_keys, ignore):
  """{key: float32 array}: `state_dict` by the dtype rules of the module docstring; raises ConversionError
  naming every key that cannot be a weight. `fixed_keys`: {torch key: width} of fixed sin-cos tables;
  keys matching an `ignore` glob are passed through unchecked (the engine skips them)."""
  out, problems, converted, skipped = {}, [], {}, []
  for key, value in state_dict.items():
    if any(fnmatch.fnmatchcase(key, g) for g in ignore):
      out[key] = value
      continue
    shape = tuple(value.shape)
    if value.dtype.kind in 'iub':
      if key.rsplit('.', 1)[-1] in INDEX_BUFFERS:
        skipped.append(key)
      else:
        problems.append(f'{key} {shape}: a {value.dtype} tensor where a float weight is expected (a buffer? skip it '
                        f'with --ignore={key})')
      continue
    if value.dtype != np.float32:
      converted.setdefault(str(value.dtype), []).append(key)
      table = _sincos_at_precision(value, fixed_keys[key]) if value.dtype in HALF and key in fixed_keys else None
      value = table if table is not None else value.astype(np.float32)
    bad = ~np.isfinite(value)
    if bad.any():
      nan = int(np.isnan(value).sum())
      problems.append(f'{key} {shape}: {int(bad.sum())} of {value.size} values are not finite ({nan} NaN, '
                      f'{int(bad.sum()) - nan} Inf)')
    out[key] = value
  if problems:
    title = f'{len(problems)} tensor(s) of the file cannot be float32 weights:'
    raise engine.ConversionError(_listing(title, problems))
  for dtype, keys in sorted(converted.items()):
    logging.warning('%d %s tensor(s) converted to float32 (%s): %s', len(keys), dtype,
                    'rounded' if dtype == 'float64' else 'exact', keys[:5] + (['...'] if len(keys) > 5 else []))
  if skipped:
    logging.warning('skipped %d integer buffer(s), not weights: %s', len(skipped), skipped[:5])
  return out


def import_state_dict(state_dict, config, fmt, allow_missing=(), ignore=()):
  """{torch key: array} in format `fmt` -> params for the model of `config` (see `engine.from_torch`)."""
  head = state_dict.get('head.bias')
  objective = tasks.create(config).build_model(head.shape[0] if head is not None else None)
  expected = jax.eval_shape(objective.init, jax.random.key(0))
  state_dict = _float_weights(state_dict, _fixed_table_keys(fmt, objective), ignore)
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
  the file had, and the caller fills the rest from a fresh init. Any other file is a ConfigError (the config
  named it).
  """
  path = epath.Path(path)
  if path.suffix in TORCH_SUFFIXES:
    raise ConfigError(f'{path}: convert PyTorch files first: python -m mae_jax.export import --in={path} ...')
  try:
    params = flax.serialization.msgpack_restore(path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except  # msgpack fails in many ways on a foreign or cut file
    raise ConfigError(f'{path} is not a params file written by python -m mae_jax.export import (truncated, '
                      f'corrupt or another format: {type(e).__name__}: {_first_line(e)})') from None
  if not isinstance(params, dict):
    raise ConfigError(f'{path} holds a {type(params).__name__}, not the params written by python -m mae_jax.export '
                      'import')
  return params
