"""JAX params -> PyTorch files: the official MAE state_dict or a timm ViT, as .pth or .safetensors.

`.pth` holds `{'model': state_dict}` like the reference's checkpoints (timm and the reference's
fine-tuning code read `checkpoint['model']`); `.safetensors` holds the flat state_dict, with the format
name in its metadata.
"""
import io

from etils import epath
import jax
import numpy as np

from mae_jax import tasks
from mae_jax.export import engine, tables

SUFFIXES = ('.pth', '.pt', '.safetensors')


def export_state_dict(params, config, fmt, img_size=None, num_classes=0):
  """params (of the run described by `config`) -> {torch key: np.ndarray} in format `fmt`.

  Args:
    params: the run's params pytree ({'encoder': ..., 'decoder': ..., ...}).
    config: the run's config; gives the model and its fixed position tables.
    fmt: a key of `tables.FORMATS`.
    img_size: build the PyTorch model for another resolution (e.g. 448 for fine-tuning): fixed tables
      are recomputed, timm's learned `pos_embed` is resized bicubically like the reference does.
    num_classes: timm formats only: a classifier `head` of this size, zero-initialised unless the params
      have one (the reference's fine-tuning re-initialises it with std 2e-5 anyway).
  """
  objective = tasks.model_for_params(config, params)
  grid = None
  if img_size:
    patch = objective.encoder.patch_size
    if img_size % patch:
      raise ValueError(f'img_size {img_size} is not a multiple of the patch size {patch}')
    grid = (img_size // patch,) * 2
  params = jax.tree.map(np.asarray, params)
  if num_classes:
    if 'head' not in tables.scope(fmt):
      raise ValueError(f'format {fmt!r} has no classifier head; num_classes is for the timm formats')
    head = params.get('head') or {'kernel': np.zeros((objective.encoder.width, num_classes), np.float32),
                                  'bias': np.zeros((num_classes,), np.float32)}
    if head['bias'].shape != (num_classes,):
      raise ValueError(f'the params have a head of {head["bias"].shape[0]} classes, not {num_classes}')
    params = {**params, 'head': head}
  return engine.to_torch(params, fmt, tables.fixed_tables(objective), grid)


def save(state_dict, path, fmt=''):
  """Writes {key: np.ndarray} as `.pth` ({'model': state_dict}) or `.safetensors`, by the extension."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  if path.suffix not in SUFFIXES:
    raise ValueError(f'{path}: the extension must be one of {SUFFIXES}')
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
  if path.suffix == '.safetensors':
    data = safetensors.torch.save(tensors, metadata={'format': fmt})
  else:
    buffer = io.BytesIO()
    torch.save({'model': tensors}, buffer)
    data = buffer.getvalue()
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def export_checkpoint(workdir, fmt, out, step=None, img_size=None, num_classes=0):
  """Reads a training run's checkpoint and writes it to `out` in format `fmt`; returns the state_dict."""
  from mae_jax.checkpoint import load_params  # pylint: disable=g-import-not-at-top
  config, params = load_params(workdir, step)
  state_dict = export_state_dict(params, config, fmt, img_size, num_classes)
  save(state_dict, out, fmt)
  return state_dict
