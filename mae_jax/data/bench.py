"""Input-pipeline benchmark: decode + augment throughput of mae_jax's loader against torchvision's.

  python -m mae_jax.data.bench --source=folder --name=DIR [--split=train] [--workers=N] [--num_images=N]
  python -m mae_jax.data.bench --source=tfds --name=imagenet2012 --data_dir=DIR --split=train --workers=8
  python -m mae_jax.data.bench --write_synthetic=200 --name=/tmp/synth   # photo-like 500x375 JPEGs, then run

Both pipelines read the same first `num_images` examples, `passes` times, with the training transform of
the config (RandomResizedCrop(224, scale=(0.2, 1), bicubic) + flip + ToTensor + Normalize by default):
mae_jax with `workers` decoding threads, torchvision with `ImageFolder` (or a Dataset over the same TFDS
records) + `DataLoader(num_workers=workers, batch_size, shuffle=True, drop_last=True)`. Reported: images/s,
images/s per worker (per CPU core when workers <= cores), and CPU milliseconds per image (user + system,
worker processes included), measured after the first batch so that start-up costs are excluded.
"""
import argparse
import gc
import io
import os
import resource
import sys
import time

import numpy as np
from PIL import Image

from mae_jax import config as config_lib
from mae_jax.data import loader, sources, transforms


def photo_like(rng, height=375, width=500, beta=1.0):
  """A random (height, width, 3) uint8 image with a 1/f^beta spectrum, like natural photographs (JPEG q90:
  about 120 KB at 500x375, near ImageNet's mean file size)."""
  fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
  frequency = np.sqrt(fx**2 + fy**2)
  frequency[0, 0] = 1.0
  noise = lambda: rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)
  shared = noise()
  image = np.stack([np.fft.irfft2((0.8 * shared + 0.45 * noise()) * frequency**-beta, s=(height, width))
                    for _ in range(3)], axis=-1)
  image = 128 + 48 * (image - image.mean()) / (image.std() + 1e-8) + rng.uniform(-20, 20, 3)
  return np.clip(image, 0, 255).astype(np.uint8)


def write_synthetic_folder(root, num_images, num_classes=10, split='train', seed=0, quality=90):
  """Writes `num_images` photo-like JPEGs (500x375 or 375x500) to root/<split>/class_<k>/; returns the split dir."""
  rng = np.random.default_rng(seed)
  directory = os.path.join(root, split)
  for i in range(num_images):
    class_dir = os.path.join(directory, f'class_{i % num_classes:03d}')
    os.makedirs(class_dir, exist_ok=True)
    height, width = (375, 500) if rng.random() < 0.75 else (500, 375)
    Image.fromarray(photo_like(rng, height, width)).save(os.path.join(class_dir, f'img_{i:06d}.jpg'), quality=quality)
  return directory


class Subset:
  """The first `n` examples of a source."""

  def __init__(self, source, n):
    self.source, self.n, self.num_classes = source, n, source.num_classes

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    return self.source[index]

  def describe(self, index):
    return self.source.describe(index)


def cpu_seconds():
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(make_batches, batch_size):
  """Images/s and CPU s/image over all batches after the first (start-up excluded)."""
  iterator = make_batches()
  next(iterator)
  t0, c0, count = time.perf_counter(), cpu_seconds(), 0
  for _ in iterator:
    count += batch_size
  wall = time.perf_counter() - t0
  iterator.close()  # ends torch's worker processes, so their CPU time is counted in RUSAGE_CHILDREN
  del iterator
  gc.collect()
  cpu = cpu_seconds() - c0
  return count / wall, cpu / max(count, 1), count


def bench_mae_jax(source, data_config, batch_size, workers, passes, seed=0):
  train = loader.TrainLoader(source, transforms.TrainTransform(data_config), batch_size, seed, num_workers=workers)
  rate, cpu, count = measure(lambda: train.iterate(0, train.steps_per_epoch * passes, prefetch=2), batch_size)
  return rate, cpu, count, train.skipped


def torch_transform(data_config):
  from torchvision import transforms as T  # pylint: disable=g-import-not-at-top
  interpolation = {'bicubic': T.InterpolationMode.BICUBIC, 'bilinear': T.InterpolationMode.BILINEAR}
  return T.Compose([
      T.RandomResizedCrop(data_config.img_size, scale=tuple(data_config.crop_scale), ratio=tuple(data_config.crop_ratio),
                          interpolation=interpolation[data_config.interpolation]),
      T.RandomHorizontalFlip(),
      T.ToTensor(),
      T.Normalize(data_config.mean, data_config.std)])


class TorchTfds:
  """A torch Dataset over the same TFDS records, decoded the way torchvision's ImageFolder decodes files."""

  def __init__(self, tfds_source, transform, n):
    self.source, self.transform, self.n = tfds_source, transform, n

  def __len__(self):
    return self.n

  def __getitem__(self, index):
    example = self.source.data[index]
    image = Image.open(io.BytesIO(example[self.source.image_key])).convert('RGB')
    return self.transform(image), int(example[self.source.label_key]) if self.source.label_key else 0


def bench_torchvision(data_config, split, source, batch_size, workers, passes):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  transform = torch_transform(data_config)
  if data_config.source == 'folder':
    dataset = datasets.ImageFolder(os.path.join(os.path.expanduser(data_config.name), split), transform=transform)
    dataset = torch.utils.data.Subset(dataset, range(len(source)))
  else:
    dataset = TorchTfds(source.source, transform, len(source))

  def batches():
    data_loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                              num_workers=workers, persistent_workers=workers > 0)
    iterator = None
    try:
      for _ in range(passes):
        iterator = iter(data_loader)
        yield from iterator
    finally:
      if iterator is not None and hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()  # pylint: disable=protected-access  (join now, to count their CPU time)

  return measure(batches, batch_size)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument('--source', default='folder', choices=('folder', 'tfds'))
  parser.add_argument('--name', required=True, help='image-folder root, or TFDS dataset name')
  parser.add_argument('--data_dir', default='', help='TFDS data_dir')
  parser.add_argument('--split', default='train')
  parser.add_argument('--workers', type=int, default=1, help='decoding threads (mae_jax) = worker processes (torch)')
  parser.add_argument('--num_images', type=int, default=0, help='the first N examples (0: all)')
  parser.add_argument('--passes', type=int, default=3, help='epochs over the images, for each pipeline')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--img_size', type=int, default=224)
  parser.add_argument('--interpolation', default='bicubic', choices=('bicubic', 'bilinear'))
  parser.add_argument('--repeats', type=int, default=1, help='alternating runs of each pipeline; the best counts')
  parser.add_argument('--skip_torch', action='store_true', help='only measure mae_jax')
  parser.add_argument('--write_synthetic', type=int, default=0,
                      help='first write N photo-like JPEGs to NAME/SPLIT (source=folder), then benchmark them')
  args = parser.parse_args(argv)
  if args.workers < 1:
    parser.error('--workers must be >= 1')

  if args.write_synthetic:
    if args.source != 'folder':
      parser.error('--write_synthetic needs --source=folder')
    directory = write_synthetic_folder(args.name, args.write_synthetic, split=args.split)
    print(f'wrote {args.write_synthetic} photo-like 500x375 JPEGs (quality 90) to {directory}', flush=True)

  config = config_lib.base_config()
  data_config = config.data
  data_config.update(source=args.source, name=args.name, data_dir=args.data_dir, img_size=args.img_size,
                     interpolation=args.interpolation)
  try:
    source = sources.create(data_config, args.split)
  except sources.DataError as e:
    sys.exit(f'mae_jax.data.bench: error: {e}')
  n = min(args.num_images or len(source), len(source))
  source = Subset(source, n)
  batch_size = min(args.batch_size, n)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  print(f'{args.source} {args.name} [{args.split}]: {n} images x {args.passes} passes, batch {batch_size}, '
        f'{args.img_size}px {args.interpolation} RandomResizedCrop + flip + normalize, {args.workers} worker(s), '
        f'{cores} CPU core(s); PIL {Image.__version__}', flush=True)

  results = {'mae_jax': [], 'torchvision': []}

  def show(name, workers_name, rate, cpu, count, extra=''):
    print(f'{name:11s} ({workers_name}={args.workers}): {rate:8.1f} img/s | {rate / args.workers:7.1f} img/s per '
          f'worker | {1e3 * cpu:6.2f} CPU ms/img  ({count} images{extra})', flush=True)

  for _ in range(args.repeats):  # alternating, so that load from elsewhere hits both alike
    rate, cpu, count, skipped = bench_mae_jax(source, data_config, batch_size, args.workers, args.passes)
    results['mae_jax'].append((rate, cpu))
    show('mae_jax', 'threads', rate, cpu, count, f', {skipped} undecodable replaced' if skipped else '')
    if args.skip_torch:
      continue
    try:
      rate, cpu, count = bench_torchvision(data_config, args.split, source, batch_size, args.workers, args.passes)
    except Exception as e:  # pylint: disable=broad-except  (e.g. ImageFolder on an undecodable file)
      print(f'torchvision: failed: {type(e).__name__}: {e}', flush=True)
      args.skip_torch = True
      continue
    results['torchvision'].append((rate, cpu))
    show('torchvision', 'num_workers', rate, cpu, count)
  if results['torchvision']:
    best = {name: (max(r for r, _ in runs), min(c for _, c in runs)) for name, runs in results.items()}
    (ours, our_cpu), (theirs, their_cpu) = best['mae_jax'], best['torchvision']
    print(f'best of {args.repeats}: mae_jax {ours:.1f} img/s ({ours / args.workers:.1f} per worker, {1e3 * our_cpu:.2f} '
          f'CPU ms/img), torchvision {theirs:.1f} img/s ({theirs / args.workers:.1f} per worker, '
          f'{1e3 * their_cpu:.2f} CPU ms/img)', flush=True)
    print(f'ratio mae_jax / torchvision: {ours / theirs:.2f}x images/s, {their_cpu / our_cpu:.2f}x fewer CPU '
          'seconds per image', flush=True)
  return results


if __name__ == '__main__':
  main()
