"""Orbax checkpoints of the whole train state, plus the config that produced them.

A checkpoint holds everything needed to continue exactly: params, optimizer state, step, the base RNG
key and the non-finite-step counters; the data pipeline's position is the step itself (see
`data/loader.py`). Restoring takes the target shardings, so a run saved on one mesh resumes on another.

Safety: orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by a crash is never picked up (leftovers are cleaned at start). A finished checkpoint that
cannot be read (a truncated file) is moved aside with a warning and the previous one is used; so is one whose
files no longer match the checksums (size and CRC32 of each file, `checksums.json`) written once its save had
completed. A checkpoint of another model is refused with a message naming the difference.

In a bucket (`gs://`) the same protocol holds: orbax writes the step under a temporary name, and commits it
by writing a `commit_success.txt` marker last (an object store cannot rename a folder atomically); a step
without the marker is never restored, and `checksums.json` is one object, uploaded whole. TensorStore writes
the arrays (each host its own shards), fsspec (gcsfs) the small files.
"""
import json
import math
import os
import time
import zlib

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mae_jax import paths
from mae_jax.config import ConfigError
from mae_jax.models import vit

# Config fields that decide the shapes of the state: a checkpoint is only resumed if they match.
IDENTITY_FIELDS = ('task', 'objective', 'model.variant', 'model.mlp_ratio', 'model.decoder', 'data.img_size')
FIELDS_ADDED_SINCE = {'task': 'pretrain'}  # what a checkpoint written before a field existed had
# Fields (or sections) whose change on resume leaves the run's meaning alone (logging, evaluation, saving, layout,
# memory, length): listed, never refused. Any other change needs config.allow_config_change to name it.
HARMLESS_FIELDS = ('log', 'eval', 'checkpoint', 'mesh', 'init_from', 'train.num_steps', 'train.epochs',
                   'data.num_workers', 'data.prefetch', 'data.eval_split', 'model.remat', 'model.remat_policy')


CHECKSUMS = 'checksums.json'  # beside the orbax items of each step: {relative path: [size, crc32]}


class CheckpointError(RuntimeError):
  """Saving failed (full disk, lost permissions); the previous checkpoints are intact."""


class CheckpointMismatch(ConfigError):
  """The workdir holds a checkpoint of another model."""


class ConfigDrift(ConfigError):
  """The run would resume with a config that changes its meaning."""


def directory(workdir):
  return paths.join(paths.absolute(workdir), 'checkpoints')


def has_checkpoint(workdir):
  """Whether `workdir` holds a (finished or set-aside) step directory, without starting a manager."""
  path = directory(workdir)
  return paths.isdir(path) and any(name.isdigit() for name in paths.listdir(path))


def _manager(path, options):
  handlers = {'state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def _lookup(tree, dotted):
  if dotted in FIELDS_ADDED_SINCE and dotted not in tree:
    return FIELDS_ADDED_SINCE[dotted]
  for key in dotted.split('.'):
    tree = tree[key]
  return tree.to_dict() if isinstance(tree, ml_collections.ConfigDict) else tree


def _normalise(value):
  """Tuples and lists compare equal after a JSON round trip."""
  if isinstance(value, dict):
    return {k: _normalise(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_normalise(v) for v in value]
  return value


def _shapes(tree):
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe_mismatch(saved_config, saved_state_metadata, config, abstract_state):
  """The first difference between a checkpoint and the current run's model, or None."""
  for field in IDENTITY_FIELDS:
    saved, current = _normalise(_lookup(saved_config, field)), _normalise(_lookup(config, field))
    if saved != current:
      return f'config.{field} is {saved!r} in the checkpoint but {current!r} now'
  saved_shapes, shapes = _shapes(saved_state_metadata['params']), _shapes(abstract_state['params'])
  for path in sorted(set(saved_shapes) | set(shapes)):
    if saved_shapes.get(path) != shapes.get(path):
      return f'params{path} has shape {saved_shapes.get(path)} in the checkpoint but {shapes.get(path)} now'
  # Orbax's metadata spells optimizer namedtuples as dicts, so compare the rest of the state by its shapes.
  all_shapes = lambda tree: sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))
  if all_shapes(saved_state_metadata) != all_shapes(abstract_state):
    return 'the optimizer state differs (another optimizer, objective or update scheme)'
  return None


class ChecksumMismatch(RuntimeError):
  """A checkpoint file differs from what was saved (flipped bits, truncation, a missing file)."""


def _crc32(path):
  crc = 0
  with paths.open_file(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 24), b''):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_checksums(folder):
  """{path relative to `folder`: [size, crc32]} of the orbax items' files of one step's folder."""
  sums = {}
  for item in ('state', 'config'):
    for path, size in paths.walk_files(paths.join(folder, item)):
      sums[path[len(str(folder).rstrip('/')) + 1:]] = [size, _crc32(path)]
  return sums


def verify_checksums(folder):
  """Raises ChecksumMismatch unless every file listed in `folder`'s checksums matches (no list: not checked,
  a checkpoint written before checksums, or one killed between its save and its checksums)."""
  listed = paths.join(folder, CHECKSUMS)
  if not paths.exists(listed):
    return
  with paths.open_file(listed) as f:
    expected = json.load(f)
  found = {path[len(str(folder).rstrip('/')) + 1:]: size for item in ('state', 'config')
           for path, size in paths.walk_files(paths.join(folder, item))}  # one listing, not a request per file
  for name, (size, crc) in sorted(expected.items()):
    path = paths.join(folder, name)
    if name not in found:
      raise ChecksumMismatch(f'{name} is missing')
    if found[name] != size:
      raise ChecksumMismatch(f'{name} has {found[name]} bytes, {size} when saved')
    if _crc32(path) != crc:
      raise ChecksumMismatch(f'{name} does not match the checksum written with it')


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = _normalise(value)
  return flat


def _shown(value):
  return f'{value:.6g}' if isinstance(value, float) else repr(value)  # 0.0015, not 0.0014999999999999998


def _covers(names, field):
  return any(field == name or field.startswith(name + '.') for name in names)


def config_changes(saved_config, config):
  """(harmless, refused): the fields that differ between a checkpoint's config and `config`, as
  (field, 'field: old -> new'); refused ones change the run and are not named by config.allow_config_change.
  Fields that only one of them has (added or removed since) are not compared."""
  saved, current = _flatten(saved_config), _flatten(config.to_dict())
  for flat in (saved, current):  # 'auto' is what it means on this backend: float32 on CPU, as older runs said
    if flat.get('model.dtype') == 'auto':
      flat['model.dtype'] = str(vit.compute_dtype(ml_collections.ConfigDict({'dtype': 'auto'})))
  allowed = HARMLESS_FIELDS + tuple(name for name in config.get('allow_config_change', '').split(',') if name)
  harmless, refused = [], []
  for field in sorted(set(saved) & set(current) - {'allow_config_change'}):  # a permission, not part of the run
    if saved[field] != current[field]:
      change = f'{field}: {_shown(saved[field])} -> {_shown(current[field])}'
      (harmless if _covers(allowed, field) else refused).append((field, change))
  return harmless, refused


class Checkpointer:

  def __init__(self, workdir, checkpoint_config):
    self.path = directory(workdir)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=checkpoint_config.every_steps, max_to_keep=checkpoint_config.keep,
        keep_period=checkpoint_config.keep_every_steps or None, enable_async_checkpointing=True,
        cleanup_tmp_directories=True)
    self.manager = _manager(self.path, options)
    self.config_changes = []  # the harmless changes since the restored checkpoint, as 'field: old -> new'
    self._unsealed = None  # the step saved last, whose checksums are written once its save has completed

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, config, force=False):
    """Saves asynchronously if `step` is on the interval (or `force`); returns whether it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
    if self._unsealed is not None:
      self.wait()  # orbax would wait for the previous save anyway; its checksums come first
    try:
      saved = self.manager.save(step, args=args, force=force)
    except Exception as e:  # an earlier async save's failure surfaces here too
      raise self._save_error(step, e) from e
    if saved:
      self._unsealed = step
    return saved

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self.latest_step(), e) from e
    self._seal()

  def _seal(self):
    """Writes the checksums of the last save, complete by now (process 0, which sees every host's files)."""
    step, self._unsealed = self._unsealed, None
    if step is None or jax.process_index() != 0:
      return
    folder = paths.join(self.path, str(step))
    try:
      if not paths.isdir(folder):
        return
      sums = json.dumps(file_checksums(folder))
      if paths.is_remote(folder):  # one upload: the object appears whole or not at all
        with paths.open_file(paths.join(folder, CHECKSUMS), 'w') as f:
          f.write(sums)
      else:
        partial = os.path.join(folder, CHECKSUMS + '.partial')
        with open(partial, 'w') as f:
          f.write(sums)
        os.replace(partial, os.path.join(folder, CHECKSUMS))
    except OSError as e:
      raise self._save_error(step, e) from e

  def _save_error(self, step, error):
    kept = [s for s in self.manager.all_steps() if paths.isdir(paths.join(self.path, str(s)))]
    return CheckpointError(f'saving the checkpoint of step {step} in {self.path} failed: {error}. '
                           f'The previous checkpoints {kept} are intact; rerun the same command to resume.')

  def restore_latest(self, abstract_state, config):
    """(state, step) of the newest readable checkpoint, or (None, None) if there is none.

    Raises CheckpointMismatch if it belongs to another model, ConfigDrift if `config` changes the run's
    meaning; skips (and moves aside) unreadable ones. Sets `config_changes`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        verify_checksums(paths.join(self.path, str(step)))
        saved_config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        metadata = self.manager.item_metadata(step)['state']
      except Exception as e:
        self._set_aside(step, e)
        continue
      mismatch = describe_mismatch(saved_config, metadata, config, abstract_state)
      if mismatch:
        raise CheckpointMismatch(
            f'the checkpoint of step {step} in {self.path} belongs to another model: {mismatch}. Use a new '
            f'--workdir, or --config.init_from={paths.dirname(self.path)} to start from its matching params.')
      harmless, refused = config_changes(saved_config, config)
      if refused:
        raise ConfigDrift(
            f'resuming the checkpoint of step {step} in {self.path} with a config that changes the run: '
            f'{"; ".join(text for _, text in refused)}. Use a new --workdir, or resume anyway with '
            f'--config.allow_config_change={",".join(field for field, _ in refused)}')
      self.config_changes = [text for _, text in harmless]
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return state.state, step
      except Exception as e:
        self._set_aside(step, e)
    return None, None

  def _set_aside(self, step, error):
    """Renames an unreadable checkpoint (orbax then ignores it) so the run falls back to the previous one."""
    source = paths.join(self.path, str(step))
    target = f'{source}.unreadable-{int(time.time())}'
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''  # not TensorStore's dump
    message = f'the checkpoint of step {step} in {self.path} is unreadable ({type(error).__name__}: {reason})'
    if jax.process_index() == 0:
      paths.rename(source, target)
    print(f'WARNING: {message}; moved it to {paths.basename(target)}, trying the previous one', flush=True)
    self.manager.reload()

  def close(self):
    self.wait()
    self.manager.close()


class BestCheckpointer:
  """The state where `metric` (an evaluator's, e.g. 'eval/top1') was highest, kept in
  <workdir>/checkpoints_best beside the latest ones (orbax keeps the one best by the saved metrics)."""

  def __init__(self, workdir, metric):
    self.metric = metric
    self.path = paths.join(paths.absolute(workdir), 'checkpoints_best')
    options = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode='max',
                                           enable_async_checkpointing=False)
    self.manager = _manager(self.path, options)

  def offer(self, step, state, config, results):
    """Saves `state` if `results` has the metric and this step is not saved yet; orbax drops the worse one."""
    if self.metric not in results or step in self.manager.all_steps():
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
    self.manager.save(step, args=args, metrics={self.metric: float(results[self.metric])}, force=True)

  def close(self):
    self.manager.close()


def load_params(workdir, step=None):
  """(config, params) of a run's checkpoint (latest by default), as host arrays, for export and warm starts."""
  # Never written to (no save is made); not `read_only`, which only logs warnings about the options it changes.
  manager = _manager(directory(workdir), ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory(workdir)}')
  try:
    verify_checksums(paths.join(directory(workdir), str(step)))
  except ChecksumMismatch as e:
    raise CheckpointError(f'the checkpoint of step {step} in {directory(workdir)} is damaged: {e}') from None
  config = ml_collections.ConfigDict(manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore())).config)
  metadata = manager.item_metadata(step)['state']
  # Restore as plain host arrays, whatever mesh wrote them.
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
  manager.close()
  return config, state['params']


def _posemb_grids(source, target):
  """(source grid, target grid, prefix tokens) when a learned position table of `source`'s shape fits
  `target`'s after resampling (same width and prefix, square grids, another size), else None."""
  if source.ndim != 3 or target.ndim != 3 or (source.shape[0], source.shape[2]) != (target.shape[0], target.shape[2]):
    return None
  (src_side, src_prefix), (dst_side, dst_prefix) = [
      (math.isqrt(n), n - math.isqrt(n) ** 2) for n in (source.shape[1], target.shape[1])]
  if src_prefix != dst_prefix or src_side == dst_side or min(src_side, dst_side) < 1:
    return None
  return src_side, dst_side, src_prefix


def merge_matching(params, source, source_name):
  """Takes every leaf of `source` whose path and shape match `params` (a warm start); reports the rest.

  A learned position table ('.../pos_embed') of another square grid is resampled to the model's grid
  (bicubic, as timm's loader and MAE's fine-tuning do)."""
  flat_source = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
  loaded, skipped, resampled = [], [], []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    value = flat_source.get(key)
    if value is not None and tuple(value.shape) == tuple(leaf.shape):
      loaded.append(key)
      return np.asarray(value, leaf.dtype)
    grids = getattr(path[-1], 'key', None) == 'pos_embed' and value is not None and _posemb_grids(value, leaf)
    if grids:
      src_side, dst_side, prefix = grids
      loaded.append(key)
      resampled.append(f'{key} {src_side}x{src_side} -> {dst_side}x{dst_side}')
      return vit.resample_posemb(np.asarray(value, np.float32), dst_side, prefix).astype(leaf.dtype)
    skipped.append(key)
    return leaf

  merged = jax.tree_util.tree_map_with_path(pick, params)
  if not loaded:
    raise ConfigError(f'config.init_from={source_name}: no parameter matches this model by name and shape')
  count = lambda keys: sum(math.prod(flat_source[k].shape) if k in flat_source else 0 for k in keys)
  print(f'Warm start from {source_name}: loaded {len(loaded)} arrays ({count(loaded):,} values)'
        f'{"; resampled " + ", ".join(resampled) if resampled else ""}; '
        f'kept the initialisation of {len(skipped)}: {skipped[:8]}{" ..." if len(skipped) > 8 else ""}', flush=True)
  return merged
