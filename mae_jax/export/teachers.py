"""Teacher files (CLIP, DINO) <-> the params of `mae_jax.models.teachers`: the layouts users have.

  python -m mae_jax.export import --format=clip-hf --in=clip-vit-base-patch16/model.safetensors --out=clip.msgpack

The key tables are `tables.FORMATS` ('clip-openai', 'clip-hf', 'clip-timm', 'dino'), applied by the one engine,
strictly (every key used, every param filled, shapes agreed). Before it, a file's layout is brought to its
table: the `visual.` / `vision_model.` prefix is stripped and the text tower of a full CLIP checkpoint
dropped (named in the log), HF's separate q/k/v are fused (a missing one is named), timm's CLIP head bias is
checked to be zero. The architecture (width, depth, patch, grid, projection) comes from the file's shapes, so
no config is needed; the file is written at its own resolution (`{'encoder': params}`) and each run resamples
the position table to its grid. OpenAI's own `ViT-B-16.pt` is a TorchScript archive and is refused
(`torch_import`): its weights come as HF's `openai/clip-vit-base-patch16` model.safetensors (clip-hf) or, once
converted where it is trusted, an open_clip state dict (clip-openai).
"""
import logging
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.export import engine, tables, torch_import
from mae_jax.models import teachers

HF_TEXT = ('text_model.', 'text_projection.', 'logit_scale')  # CLIPModel's text side
QKV = re.compile(r'^(encoder\.layers\.\d+\.self_attn\.)([qkv])_proj\.(weight|bias)$')


def _drop(state_dict, keep, what):
  dropped = sorted(k for k in state_dict if not keep(k))
  if dropped:
    logging.info('not the image tower (%s), left out: %d keys, e.g. %s', what, len(dropped), dropped[:3])
  return {k: v for k, v in state_dict.items() if keep(k)}


def canonical(state_dict, fmt):
  """The file's {key: array} in the keys of `tables.FORMATS[fmt]`."""
  sd = dict(state_dict)
  if fmt == 'clip-openai' and any(k.startswith('visual.') for k in sd):
    sd = {k[len('visual.'):]: v for k, v in _drop(sd, lambda k: k.startswith('visual.'), 'the text tower').items()}
  if fmt == 'clip-hf':
    sd = _drop(sd, lambda k: not k.startswith(HF_TEXT), "CLIPModel's text tower")
    sd = {k[len('vision_model.'):] if k.startswith('vision_model.') else k: v for k, v in sd.items()}
    parts, problems = {}, []
    for key in [k for k in sd if QKV.match(k)]:
      prefix, which, kind = QKV.match(key).groups()
      parts.setdefault((prefix, kind), {})[which] = sd.pop(key)
    for (prefix, kind), found in sorted(parts.items()):
      missing = [f'{prefix}{w}_proj.{kind}' for w in 'qkv' if w not in found]
      if missing:
        problems += [f'{key}: missing from the file (its siblings are there)' for key in missing]
      else:
        sd[f'{prefix}qkv_proj.{kind}'] = np.concatenate([found[w] for w in 'qkv'], axis=0)
    if problems:
      raise engine.ConversionError('\n  '.join([f'the file does not fit format {fmt!r}:'] + problems))
  if fmt == 'clip-timm' and 'head.bias' in sd and np.any(sd['head.bias'] != 0):
    raise engine.ConversionError("head.bias: not zero; the CLIP projection has no bias (timm's conversion of "
                                 'OpenAI CLIP writes zeros): this is a fine-tuned classifier, not a CLIP tower')
  return sd


def architecture(sd, fmt):
  """(arch, dims, img_size, proj_dim, mlp_ratio) of the teacher the canonical state dict `sd` holds."""
  shapes = {}
  rules = engine._compile(fmt)  # pylint: disable=protected-access
  for key, value in sd.items():
    hit = engine._translate(rules, key, 1)  # pylint: disable=protected-access
    if hit and hit[2] in tables.KINDS:
      shapes[hit[1]] = tables.KINDS[hit[2]][1](np.zeros(np.shape(value), np.float32)).shape
    elif hit:
      shapes[hit[1]] = np.shape(value)
  need = ('encoder/cls_token', 'encoder/pos_embed', 'encoder/patch_embed/proj/kernel', 'encoder/blocks_0/mlp/fc1/kernel')
  missing = [path for path in need if path not in shapes]
  if missing:
    raise engine.ConversionError(f'the file does not fit format {fmt!r}: it lacks the params {missing} (keys: '
                                 f'{sorted(sd)[:8]} ...)')
  width = shapes['encoder/cls_token'][-1]
  patch = shapes['encoder/patch_embed/proj/kernel'][0]
  depth = 1 + max(int(m[1]) for p in shapes if (m := re.match(r'encoder/blocks_(\d+)/', p)))
  side = math.isqrt(shapes['encoder/pos_embed'][1] - 1)
  proj = shapes.get('encoder/head/kernel', (0, 0))[1]
  dims = dict(width=width, depth=depth, num_heads=max(1, width // 64), patch_size=patch)
  return (tables.TEACHER_FORMATS[fmt], dims, side * patch, proj,
          shapes['encoder/blocks_0/mlp/fc1/kernel'][1] / width)


def teacher_for(sd, fmt):
  arch, dims, img_size, proj, mlp_ratio = architecture(sd, fmt)
  return teachers.module(arch, dims, img_size, proj, mlp_ratio)


def import_state_dict(state_dict, fmt, allow_missing=(), ignore=()):
  """{torch key: array} in teacher format `fmt` -> {'encoder': the teacher's params}, at the file's resolution."""
  sd = torch_import._float_weights(canonical(state_dict, fmt), {}, ignore)  # pylint: disable=protected-access
  teacher = teacher_for(sd, fmt)
  images = jnp.zeros((1, teacher.img_size, teacher.img_size, 3))
  expected = {'encoder': jax.eval_shape(teacher.init, jax.random.key(0), images)['params']}
  return engine.from_torch(sd, fmt, expected, {}, tuple(allow_missing), tuple(ignore))


def export_state_dict(params, fmt):
  """{'encoder': teacher params} -> {torch key: array} in `fmt`'s file layout (HF keys under `vision_model.`)."""
  fixed = {}
  head = params['encoder'].get('head')
  if fmt == 'clip-timm' and head is not None:
    fixed['encoder/head/bias'] = np.zeros(head['kernel'].shape[1], np.float32)
  sd = engine.to_torch(jax.tree.map(np.asarray, params), fmt, fixed)
  if fmt == 'clip-hf':
    out = {}
    for key, value in sd.items():
      if '.self_attn.qkv_proj.' in key:
        for which, part in zip('qkv', np.split(value, 3, axis=0)):
          out['vision_model.' + key.replace('qkv_proj', f'{which}_proj')] = part
      else:
        out[key if key.startswith('visual_projection') else 'vision_model.' + key] = value
    sd = out
  return sd


def import_file(in_path, out, fmt, allow_missing=(), ignore=()):
  """Reads a teacher file, writes its params as msgpack to `out` (for config.mr_mae.teachers.<name>.init_from)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  params = import_state_dict(torch_import.load_state_dict(in_path), fmt, allow_missing, ignore)
  out = epath.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(flax.serialization.msgpack_serialize(params))
  return params
