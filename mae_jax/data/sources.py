"""Image sources: random access to (uint8 HWC RGB image, int label) pairs.

A source is anything with `__len__`, `__getitem__(i) -> (image, label)` and `num_classes`. Random access
(rather than a stream) is what makes the input pipeline deterministic and resumable: the batch of a step is
a pure function of (seed, step), so a checkpoint's step number is the iterator's position.
"""
import numpy as np
from PIL import Image


class ArraySource:
  """In-memory images (N, H, W, 3) uint8 and labels (N,)."""

  def __init__(self, images, labels, num_classes):
    self.images, self.labels, self.num_classes = images, labels, num_classes

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return self.images[index], int(self.labels[index])


def embedded_digits(split, size=32, test_size=300):
  """The embedded offline dataset: scikit-learn's 1,797 real handwritten digits (UCI), 10 classes.

  The 8x8 grey scans are upscaled (bicubic) to `size` and repeated to RGB. A fixed permutation puts
  `test_size` images in 'test' (for kNN) and the rest in 'train'.
  """
  from sklearn.datasets import load_digits  # ships the data inside the wheel: no download
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  chosen = {'train': order[test_size:], 'test': order[:test_size]}
  if split not in chosen:
    raise ValueError(f"the embedded dataset has splits 'train' and 'test', not {split!r}")
  scans = (digits.images[chosen[split]] * (255.0 / 16.0)).round().astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in scans])
  return ArraySource(np.repeat(images[..., None], 3, axis=-1), digits.target[chosen[split]], num_classes=10)


EMBEDDED = {'digits': embedded_digits}


def create(data_config, split):
  """The source named by `config.data` for `split`."""
  if data_config.source == 'embedded':
    if data_config.name not in EMBEDDED:
      raise ValueError(f'config.data.name={data_config.name!r}: embedded datasets are {sorted(EMBEDDED)}')
    return EMBEDDED[data_config.name](split)
  raise ValueError(f'config.data.source={data_config.source!r} is not available')
