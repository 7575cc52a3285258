"""Run logging: a console progress line with ETA, TensorBoard events and a JSONL log (process 0 only)."""
import datetime
import json
import os
import time

import numpy as np


class Writer:

  def __init__(self, workdir, total_steps, start_step, enabled=True):
    self.enabled, self.total_steps = enabled, total_steps
    self.jsonl_path = os.path.join(workdir, 'metrics.jsonl')
    self._tb, self._warned = None, set()
    if enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._last_time, self._last_step = time.time(), start_step

  def scalars(self, step, values):
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    try:
      with open(self.jsonl_path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')
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

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
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
