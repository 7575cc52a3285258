"""Deterministic, host-sharded, resumable batching over a random-access source.

The global batch of step s is a pure function of (seed, s): epoch e = s // steps_per_epoch reads a
permutation seeded by (seed, e), and each image's augmentation is seeded by (seed, s, image index). So
every host agrees on the global batch whatever the number of hosts, each host decodes only its slice,
and resuming at step s reproduces exactly the batches an uninterrupted run would have seen.
"""
import collections
from concurrent import futures

import numpy as np


class TrainLoader:

  def __init__(self, source, transform, global_batch_size, seed, process_index=0, process_count=1):
    if global_batch_size % process_count:
      raise ValueError(f'global batch size {global_batch_size} is not divisible by the {process_count} processes')
    if len(source) < global_batch_size:
      raise ValueError(f'the training split has {len(source)} images, fewer than one batch of {global_batch_size}')
    self.source, self.transform, self.seed = source, transform, seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.process_index = process_index
    self.steps_per_epoch = len(source) // global_batch_size  # drop_last, like the reference's sampler

  def global_indices(self, step):
    epoch, position = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    return order[position * self.global_batch_size:(position + 1) * self.global_batch_size]

  def local_batch(self, step):
    """This process's slice of the global batch of `step`: {'image': (b, H, W, 3) f32, 'label': (b,) i32}."""
    start = self.process_index * self.local_batch_size
    indices = self.global_indices(step)[start:start + self.local_batch_size]
    images, labels = [], []
    for index in indices:
      image, label = self.source[index]
      images.append(self.transform(image, np.random.default_rng([self.seed, step, int(index)])))
      labels.append(label)
    return {'image': np.stack(images), 'label': np.asarray(labels, np.int32)}

  def iterate(self, start_step, end_step, prefetch=2):
    """Yields local batches for steps [start_step, end_step), preparing `prefetch` ahead on a thread."""
    with futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = collections.deque()
      next_step = start_step
      while next_step < end_step or pending:
        while next_step < end_step and len(pending) <= prefetch:
          pending.append(pool.submit(self.local_batch, next_step))
          next_step += 1
        yield pending.popleft().result()


def eval_batches(source, transform, batch_size):
  """Every image of `source` once, in order: {'image', 'label'} batches (the last may be smaller)."""
  for start in range(0, len(source), batch_size):
    items = [source[i] for i in range(start, min(start + batch_size, len(source)))]
    yield {'image': np.stack([transform(image) for image, _ in items]),
           'label': np.asarray([label for _, label in items], np.int32)}
