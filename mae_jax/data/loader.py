"""Deterministic, host-sharded, resumable batching over a random-access source, decoded by a thread pool.

The global batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch reads a
permutation seeded by (seed, e), and the augmentation of the image in global slot k is seeded by
(seed, s, index of slot k). So every host agrees on the global batch whatever the number of hosts, each
host decodes only its contiguous slice, and resuming at step s reproduces exactly the batches an
uninterrupted run would have seen (a checkpoint's step is the iterator's position).

An example that does not decode (corrupt, truncated, empty, not an image, too large) is replaced by the
next index of the dataset that decodes, with the original slot's augmentation seed; whether a file decodes
is a property of the data, so replacement keeps batches full and determinism intact. Replacements are
counted (`skipped`), the first few bad examples of a source are printed once, and known-bad indices are
remembered (per source object) so they are not decoded again.

Images are decoded by `num_workers` threads (PIL releases the GIL while decoding and resizing), one task
per image, `prefetch` batches ahead of the one being consumed.
"""
import collections
import os
import sys
import threading
import weakref
from concurrent import futures

import numpy as np

from mae_jax.data import decode
from mae_jax.data.sources import DataError

MAX_CONSECUTIVE_BAD = 64  # this many bad examples in a row: the data (not one file) is broken
SHOWN_BAD = 5             # bad examples printed by name; the rest are only counted


def default_num_workers():
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  return max(1, min(cores, 32))  # past ~32 threads the GIL-held share of the per-image work dominates


class BadExamples:
  """The undecodable examples of one source (shared by every loader of it, thread-safe): known-bad indices
  are not decoded again, and the first few are named in a warning, once per process."""

  def __init__(self, source):
    self.source = weakref.proxy(source)
    self.lock = threading.Lock()
    self.bad = {}  # index -> reason

  def add(self, index, reason):
    with self.lock:
      if index in self.bad:
        return
      self.bad[index] = reason
      count = len(self.bad)
    if count <= SHOWN_BAD:
      more = ' (further ones are only counted: data/skipped)' if count == SHOWN_BAD else ''
      print(f'mae_jax: warning: skipping an undecodable image: {self.source.describe(index)}: {reason}{more}',
            file=sys.stderr, flush=True)

  def is_bad(self, index):
    return index in self.bad  # a dict read is atomic; a stale miss only means one more decode attempt


_BAD_EXAMPLES = weakref.WeakKeyDictionary()
_BAD_EXAMPLES_LOCK = threading.Lock()


def bad_examples(source):
  """The BadExamples record of `source` (one per source object)."""
  with _BAD_EXAMPLES_LOCK:
    if source not in _BAD_EXAMPLES:
      _BAD_EXAMPLES[source] = BadExamples(source)
    return _BAD_EXAMPLES[source]


def load_decodable(source, index):
  """(image, label, index used) for `index` or, if it does not decode, for the next index that does.
  The number of bad examples passed over is (used - index) % len(source)."""
  bad, n = bad_examples(source), len(source)
  for attempt in range(min(MAX_CONSECUTIVE_BAD, n)):
    j = (index + attempt) % n
    if bad.is_bad(j):
      continue
    try:
      image, label = source[j]
      return image, label, j
    except decode.BadImage as e:
      bad.add(j, str(e))
  examples = '; '.join(f'{source.describe(i)}: {r}' for i, r in list(bad.bad.items())[-3:])
  raise DataError(f'{min(MAX_CONSECUTIVE_BAD, n)} consecutive examples from index {index} do not decode, '
                  f'is the dataset broken? e.g. {examples}')


class Counter:
  """A thread-safe count."""

  def __init__(self):
    self.value, self._lock = 0, threading.Lock()

  def add(self, amount):
    if amount:
      with self._lock:
        self.value += amount


class TrainLoader:

  def __init__(self, source, transform, global_batch_size, seed, process_index=0, process_count=1,
               num_workers=0):
    if global_batch_size % process_count:
      raise DataError(f'global batch size {global_batch_size} is not divisible by the {process_count} processes')
    if len(source) < global_batch_size:
      raise DataError(f'the training split has {len(source)} images, fewer than one batch of {global_batch_size}')
    self.source, self.transform, self.seed = source, transform, seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = len(source) // global_batch_size  # drop_last, like the reference's sampler
    self.num_workers = num_workers or default_num_workers()
    self.bad = bad_examples(source)
    self._skipped = Counter()
    self._order = (None, None)  # (epoch, permutation) of the last epoch used

  @property
  def skipped(self):
    """Bad examples replaced so far by this loader (logged as data/skipped)."""
    return self._skipped.value

  def global_indices(self, step):
    epoch, position = divmod(step, self.steps_per_epoch)
    cached_epoch, order = self._order
    if cached_epoch != epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._order = (epoch, order)
    return order[position * self.global_batch_size:(position + 1) * self.global_batch_size]

  def local_indices(self, step):
    start = self.process_index * self.local_batch_size
    return self.global_indices(step)[start:start + self.local_batch_size]

  def _fill(self, batch, slot, step, index):
    image, label, used = load_decodable(self.source, int(index))
    self._skipped.add((used - int(index)) % len(self.source))
    self.transform(image, np.random.default_rng([self.seed, step, int(index)]), out=batch['image'][slot])
    batch['label'][slot] = label

  def _submit(self, pool, step):
    indices = self.local_indices(step)
    size = self.transform.size
    batch = {'image': np.empty((len(indices), size, size, 3), np.float32),
             'label': np.empty((len(indices),), np.int32)}
    if pool is None:
      for slot, index in enumerate(indices):
        self._fill(batch, slot, step, index)
      return batch, []
    return batch, [pool.submit(self._fill, batch, slot, step, index) for slot, index in enumerate(indices)]

  def local_batch(self, step):
    """This process's slice of the global batch of `step`: {'image': (b, H, W, 3) f32, 'label': (b,) i32}."""
    return self._submit(None, step)[0]

  def iterate(self, start_step, end_step, prefetch=2):
    """Yields local batches for steps [start_step, end_step); `prefetch` batches are decoded ahead."""
    pool = futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix='mae_jax_data')
    pending = collections.deque()
    next_step = start_step
    try:
      while next_step < end_step or pending:
        while next_step < end_step and len(pending) <= prefetch:
          pending.append(self._submit(pool, next_step))
          next_step += 1
        batch, tasks = pending.popleft()
        for task in tasks:
          task.result()  # re-raises a worker's error (DataError) here, in the consumer
        yield batch
    finally:
      pool.shutdown(wait=False, cancel_futures=True)


class EvalBatches:
  """Every decodable image of `source` once, in order: {'image', 'label'} batches (the last may be smaller).

  Undecodable images are dropped (and counted in `skipped`): evaluation must not count an image twice.
  Dropping depends only on the data, so every host sees the same batches.
  """

  def __init__(self, source, transform, batch_size, num_workers=0):
    self.source, self.transform, self.batch_size = source, transform, batch_size
    self.num_workers = num_workers or default_num_workers()
    self.bad = bad_examples(source)
    self._skipped = Counter()

  @property
  def skipped(self):
    """Images dropped so far by this iterable."""
    return self._skipped.value

  def _load(self, index):
    try:
      if self.bad.is_bad(index):
        raise decode.BadImage(self.bad.bad[index])
      image, label = self.source[index]
    except decode.BadImage as e:
      self.bad.add(index, str(e))
      self._skipped.add(1)
      return None
    return self.transform(image), label

  def __iter__(self):
    with futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix='mae_jax_eval') as pool:
      starts = range(0, len(self.source), self.batch_size)
      submit = lambda s: [pool.submit(self._load, i) for i in range(s, min(s + self.batch_size, len(self.source)))]
      pending = collections.deque(submit(s) for s in starts[:2])
      for k in range(len(starts)):
        if k + 2 < len(starts):
          pending.append(submit(starts[k + 2]))
        items = [x for x in (task.result() for task in pending.popleft()) if x is not None]
        if items:
          yield {'image': np.stack([image for image, _ in items]),
                 'label': np.asarray([label for _, label in items], np.int32)}


def eval_batches(source, transform, batch_size, num_workers=0):
  """Every decodable image of `source` once, in order (see EvalBatches)."""
  return EvalBatches(source, transform, batch_size, num_workers)
