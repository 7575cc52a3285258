"""Run logging: a console progress line with ETA, TensorBoard events and a JSONL log (process 0 only).

Locally each record is appended to `metrics.jsonl` as it is logged. An object store cannot append, so in a
bucket the records are buffered and the whole object rewritten (one atomic upload) by `flush`, which the loop
calls with every checkpoint save and at the end: a run killed after a save loses no record of the steps
before it, and the steps after it are trained and logged again when it resumes (as locally). TensorBoard's
event file in a bucket is likewise kept in memory and uploaded whole at each of tensorboardX's flushes
(every 2 minutes and at `flush`); a resumed run starts a new event file beside it.
"""
import datetime
import io
import json
import time

import numpy as np

from mae_jax import paths


class _BucketEventFile:
  """tensorboardX's record writer for `gs://`, through `paths` (tensorboardX's own uses another client and
  uploads again when garbage-collected after `close`, retrying for minutes once the bucket is unreachable)."""

  def __init__(self, path):
    self.path, self.buffer, self.uploaded, self.warned = path, io.BytesIO(), 0, False

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    if self.buffer.tell() == self.uploaded:
      return
    try:
      with paths.open_file(self.path, 'wb') as f:
        f.write(self.buffer.getvalue())
      self.uploaded = self.buffer.tell()
    except Exception as e:  # pylint: disable=broad-except  # in tensorboardX's thread: kept, tried again next flush
      if not self.warned:
        self.warned = True
        print(f'WARNING: TensorBoard logging failed ({type(e).__name__}: {e}); retrying at the next flush', flush=True)

  close = flush


class _BucketEventFiles:

  def open(self, path):
    return _BucketEventFile(path)

  def directory_check(self, path):
    del path  # a bucket has no folders to create


class Writer:

  def __init__(self, workdir, total_steps, start_step, enabled=True):
    self.enabled, self.total_steps = enabled, total_steps
    self.jsonl_path = paths.join(workdir, 'metrics.jsonl')
    self._tb, self._warned = None, set()
    self._remote = paths.is_remote(workdir)
    self._lines = []  # in a bucket: every line of the object, rewritten whole by flush()
    self._dirty = False
    if enabled:
      from tensorboardX import SummaryWriter, record_writer
      record_writer.register_writer_factory('gs', _BucketEventFiles())
      self._tb = SummaryWriter(paths.join(workdir, 'tensorboard'))
      if self._remote and paths.exists(self.jsonl_path):
        self._lines = paths.read_bytes(self.jsonl_path).decode().splitlines(keepends=True)
    self._last_time, self._last_step = time.time(), start_step

  def scalars(self, step, values):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    line = json.dumps({'step': step, **values}) + '\n'
    if self._remote:
      self._lines.append(line)
      self._dirty = True
    try:
      if not self._remote:
        with open(self.jsonl_path, 'a') as f:
          f.write(line)
    except OSError as e:  # a full disk must not kill the run here: checkpoints report their own failures
      self._warn('jsonl', f'could not append to {self.jsonl_path}: {e}')
    try:
      for name, value in values.items():
        self._tb.add_scalar(name, value, step)
    except Exception as e:  # pylint: disable=broad-except  # TensorBoard is a view: never worth the run
      self._warn('tensorboard', f'TensorBoard logging failed ({type(e).__name__}: {e}); training goes on without it')

  def images(self, step, name, grid):
    """`grid`: (H, W, 3) floats in [0, 1]."""
    if self.enabled:
      try:
        self._tb.add_image(name, np.clip(grid, 0, 1), step, dataformats='HWC')
        self._tb.flush()
      except Exception as e:  # pylint: disable=broad-except
        self._warn('tensorboard', f'TensorBoard logging failed ({type(e).__name__}: {e}); training goes on without it')

  def _warn(self, kind, message):
    """Each kind of failure once: a broken disk or writer would otherwise repeat it every step."""
    if kind not in self._warned:
      self._warned.add(kind)
      print(f'WARNING: {message}', flush=True)

  def progress(self, step, images_per_step, values):
    """Prints one line and returns the throughput since the previous call."""
    now = time.time()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_time, self._last_step = now, step
    images_per_sec = images_per_step / max(seconds_per_step, 1e-9)
    if self.enabled:
      eta = datetime.timedelta(seconds=int(seconds_per_step * (self.total_steps - step)))
      shown = ' | '.join(f'{k} {v:.4g}' for k, v in values.items())
      print(f'step {step}/{self.total_steps} | {shown} | {images_per_sec:.1f} img/s | ETA {eta}', flush=True)
    return images_per_sec

  def flush(self):
    """Writes what is buffered: the JSONL object in a bucket (locally every line is written already) and the
    TensorBoard events."""
    if not self.enabled:
      return
    if self._dirty:
      try:
        with paths.open_file(self.jsonl_path, 'w') as f:
          f.write(''.join(self._lines))
        self._dirty = False
      except Exception as e:  # pylint: disable=broad-except  # kept in memory: the next flush tries again
        self._warn('jsonl', f'could not write {self.jsonl_path}: {type(e).__name__}: {e}')
    try:
      self._tb.flush()
    except Exception as e:  # pylint: disable=broad-except
      self._warn('tensorboard', f'TensorBoard logging failed ({type(e).__name__}: {e}); training goes on without it')

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(workdir):
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  records = []
  with paths.open_file(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a killed process
        pass
  return records


def image_grid(columns, mean, std):
  """Rows of samples, one column per entry of `columns` (name -> (N, H, W, 3) normalised images)."""
  pad = 2
  cells = [np.asarray(c) * np.asarray(std) + np.asarray(mean) for c in columns.values()]
  rows = [np.concatenate([np.pad(c[i], ((pad, pad), (pad, pad), (0, 0)), constant_values=1.0) for c in cells], 1)
          for i in range(cells[0].shape[0])]
  return np.concatenate(rows, axis=0)
