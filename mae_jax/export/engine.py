"""The one engine that applies a key table (`tables.FORMATS`) in either direction.

Nothing is dropped silently. On export every param in the format's scope must match a rule. On import
every key of the file must be used (or explicitly `ignore`d) and every param the model expects must be
filled (or explicitly `allow_missing`); shapes must agree. One error lists every offending key. The only keys
a table drops are its 'unused' ones: the reference's dead entries, written on export as the objective gives
them so that the reference's strict load succeeds, shape-checked and skipped on import.
"""
import fnmatch
import logging
import math
import re
from typing import NamedTuple

import flax
import numpy as np

from mae_jax.export import tables
from mae_jax.models.vit import posemb_sincos_2d, resample_posemb

SINCOS_ATOL = 1e-5  # float32 sin/cos from numpy or torch agree far better than this


class ConversionError(ValueError):
  """Keys, shapes or values that do not fit a format; the message names each key."""


def _fail(title, problems, limit=40):
  lines = problems[:limit] + ([f'... and {len(problems) - limit} more'] if len(problems) > limit else [])
  raise ConversionError('\n  '.join([title] + lines))


class _Rule(NamedTuple):
  keys: tuple  # (jax path, torch key) templates
  patterns: tuple  # their compiled regexes
  kind: str
  group: int  # index of the first rule of its block, so output keys come block by block


def _compile(fmt):
  if fmt not in tables.FORMATS:
    raise ValueError(f'unknown format {fmt!r}; choose one of {sorted(tables.FORMATS)}')
  regex = lambda p: re.compile(re.escape(p).replace(re.escape('{i}'), r'(?P<i>\d+)') + '$')
  rules, groups = [], {}
  for n, (jax, torch, kind) in enumerate(tables.FORMATS[fmt]):
    group = groups.setdefault(jax.partition('{i}')[0] if '{i}' in jax else jax, n)
    rules.append(_Rule((jax, torch), (regex(jax), regex(torch)), kind, group))
  return rules


def _translate(rules, key, side, wanted=None):
  """The rule matching `key` on `side` (0: jax, 1: torch): (order, the other side's key, kind), or None.
  Where several rules match (a torch key that two JAX layouts share), the first whose other side is in
  `wanted` wins."""
  hits = []
  for n, rule in enumerate(rules):
    m = rule.patterns[side].match(key)
    if m:
      i = m.groupdict().get('i')
      other = rule.keys[1 - side]
      other = other.replace('{i}', i) if i else other
      hits.append(((rule.group, int(i) if i else -1, n), other, rule.kind))
  preferred = [hit for hit in hits if wanted is not None and hit[1] in wanted]
  return (preferred or hits or [None])[0]


def _matches(key, globs):
  return any(fnmatch.fnmatchcase(key, g) for g in globs)


def _grid(table):
  side = math.isqrt(table.shape[1])
  return (side, side)


def _prefix(table):
  """The rows before the patch grid of a (1, prefix + h*h, D) table: 1 (MAE's cls row) or 0 (ConvMAE v1's)."""
  return table.shape[1] - _grid(table)[0] ** 2


def to_torch(params, fmt, fixed, grid=None):
  """params pytree -> {torch key: np.ndarray}, in the table's order.

  Args:
    params: params pytree; only the format's scope is exported.
    fmt: a key of `tables.FORMATS`.
    fixed: the model's fixed tables, {jax path: (1, 1 + L, D)}, and its 'unused' tensors (`tables.fixed_tables`).
    grid: optional (h, w) patch grid of the target model, when it differs from the trained one.
  """
  rules = _compile(fmt)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  flat = {k: v for k, v in flat.items() if k.split('/')[0] in tables.scope(fmt)}
  out, problems = [], []
  for path, value in flat.items():
    hit = _translate(rules, path, 0)
    if hit is None or (hit[2] in tables.POSITION_KINDS and path in fixed) or hit[2] == tables.UNUSED:
      problems.append(f'{path} {np.shape(value)}: no rule for it in format {fmt!r}')
      continue
    order, key, kind = hit
    if kind in tables.POSITION_KINDS:  # a learned table (a fine-tuned model's), resampled for another grid
      value = (resample_posemb(value, grid, _prefix(value)) if grid is not None and tuple(grid) != _grid(value)
               else value)
      out.append((order, key, np.array(value, np.float32, order='C')))
      continue
    out.append((order, key, np.array(tables.KINDS[kind][0](np.asarray(value)), order='C')))
  present = {path.split('/')[0] for path in flat}
  for n, rule in enumerate(rules):
    (jax, key), kind = rule.keys, rule.kind
    if kind not in (*tables.POSITION_KINDS, tables.UNUSED) or jax.split('/')[0] not in present or jax not in fixed:
      continue
    if kind == tables.UNUSED:  # as the objective gives it (dtype included: a buffer may be int64)
      out.append(((rule.group, -1, n), key, np.asarray(fixed[jax])))
      continue
    table = fixed[jax]
    if grid is not None and tuple(grid) != _grid(table):
      table = (posemb_sincos_2d(table.shape[-1], grid, _prefix(table) > 0)[None] if kind == 'sincos'
               else resample_posemb(table, grid, _prefix(table)))
    out.append(((rule.group, -1, n), key, np.asarray(table, np.float32)))
  if problems:
    _fail(f'cannot export to {fmt!r}:', problems)
  skipped = sorted({k.split('/')[0] for k in flax.traverse_util.flatten_dict(params, sep='/')} - present)
  if skipped:
    logging.info('format %r holds %s; not exported: %s', fmt, sorted(present), skipped)
  return {key: value for _, key, value in sorted(out, key=lambda t: t[0])}


def _check_position_table(key, value, table):
  """None if `value` is MAE's sin-cos table (for any grid), else the problem. Our tables are fixed, so a
  learned (fine-tuned) table cannot be loaded; a different grid is fine: the table is recomputed."""
  width, prefix = table.shape[-1], _prefix(table)
  if value.ndim != 3 or value.shape[0] != 1 or value.shape[-1] != width or _prefix(value) != prefix:
    return f'{key} {value.shape}: not a (1, {prefix} + h*w, {width}) position table'
  own = posemb_sincos_2d(width, _grid(value), prefix > 0)[None]
  err = float(np.max(np.abs(value - own)))
  if err > SINCOS_ATOL:
    return (f'{key}: differs from the fixed sin-cos table of its {_grid(value)[0]}x{_grid(value)[1]} grid by up '
            f'to {err:.3g} (learned, fine-tuned or resized); the JAX ViT only has the fixed table. To load the '
            f'rest anyway (outputs will then differ from the PyTorch model), ignore it: --ignore={key}')
  if value.shape != table.shape:
    logging.warning('%s: the file was trained on a %dx%d patch grid, the model uses %dx%d; the fixed sin-cos '
                    'table is recomputed for the model (exact for MAE; the reference fine-tuning code instead '
                    'resizes it bicubically).', key, *_grid(value), *_grid(table))
  return None


def from_torch(state_dict, fmt, expected, fixed, allow_missing=(), ignore=()):
  """{torch key: array} -> params pytree holding exactly the model's params in the format's scope.

  Args:
    state_dict: {torch key: np.ndarray}.
    fmt: a key of `tables.FORMATS`.
    expected: the model's params (arrays or ShapeDtypeStructs), e.g. `jax.eval_shape(objective.init, rng)`.
    fixed: the model's fixed tables, {jax path: (1, 1 + L, D)}; the file's must be sin-cos tables. Also the
      shapes of its 'unused' tensors.
    allow_missing: globs of torch keys that may be absent (a known partial layout, e.g. 'decoder*'); the
      result then lacks those params.
    ignore: globs of torch keys in the file that are deliberately not used.
  """
  rules = _compile(fmt)
  flat = flax.traverse_util.flatten_dict(expected, sep='/')
  expected = {k: v for k, v in flat.items() if k.split('/')[0] in tables.scope(fmt)}
  params, problems = {}, []
  for key, value in state_dict.items():
    if _matches(key, ignore):
      logging.warning('%s %s: ignored as asked', key, tuple(value.shape))
      continue
    hit = _translate(rules, key, 1, wanted=expected)
    if hit is None:
      problems.append(f'{key} {tuple(value.shape)}: unexpected, no rule for it in format {fmt!r}')
      continue
    _, path, kind = hit
    if kind == tables.UNUSED:
      if path in fixed and tuple(value.shape) != fixed[path].shape:
        problems.append(f'{key}: shape {tuple(value.shape)}, the reference model has {fixed[path].shape}')
      else:
        logging.info('%s %s: not used by the model (nor by the reference); skipped', key, tuple(value.shape))
      continue
    if kind in tables.POSITION_KINDS and path in fixed:
      problem = _check_position_table(key, value, fixed[path])
      problems += [problem] if problem else []
    elif path not in expected:
      problems.append(f'{key} {tuple(value.shape)}: unexpected, the model has no param {path}')
    else:
      convert = (lambda x: x) if kind in tables.POSITION_KINDS else tables.KINDS[kind][1]  # a learned table
      converted, want = np.ascontiguousarray(convert(value)), expected[path]
      if kind in tables.POSITION_KINDS and converted.shape != tuple(want.shape) and converted.ndim == 3:
        converted = resample_posemb(converted, _grid(want)[0], _prefix(want))  # trained at another resolution
      if converted.shape != tuple(want.shape):
        problems.append(f'{key}: shape {tuple(value.shape)} gives {path} {converted.shape}, the model has '
                        f'{tuple(want.shape)}')
      else:
        params[path] = converted.astype(want.dtype, copy=False)
  for path in expected:
    hit = _translate(rules, path, 0)
    if hit is None:
      problems.append(f'{path}: the model has this param but format {fmt!r} has no rule for it')
    elif path not in params and not _matches(hit[1], allow_missing):
      reported = hit[1] in state_dict and not _matches(hit[1], ignore)
      problems += [] if reported else [f'{hit[1]}: missing from the file (the model\'s {path})']
  if problems:
    _fail(f'the file does not fit format {fmt!r} and the model (a known partial file, e.g. the encoder-only '
          "mae_pretrain_vit_*.pth, loads with --allow_missing='decoder*,mask_token'; unwanted keys are "
          'skipped with --ignore=GLOB):', problems)
  return flax.traverse_util.unflatten_dict(params, sep='/')
