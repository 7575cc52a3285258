"""Image sources: random access to (RGB image, int label) pairs.

A source has `__len__`, `num_classes`, `__getitem__(i) -> (image, label)` where the image is an RGB
`PIL.Image` or an (H, W, 3) uint8 array, and `describe(i)` (a path or a record name, for messages).
`__getitem__` raises `decode.BadImage` for an example that does not decode; the loader replaces it. Random
access (rather than a stream) is what makes the input pipeline deterministic and resumable: the batch of a
step is a pure function of (seed, step), so a checkpoint's step number is the iterator's position.

  embedded  scikit-learn's handwritten digits, in memory (offline demo and tests)
  folder    `config.data.name`/<split>/<class>/**/*.{jpg,jpeg,png,ppm,bmp,pgm,tif,tiff,webp}, like
            torchvision's ImageFolder (same classes, labels and order), hidden entries ignored
  tfds      any prepared TFDS image dataset in array_record format, read with `tfds.data_source`
            (random access, no TensorFlow), e.g. imagenet2012 built from the manual download

A folder may be in a bucket (`gs://BUCKET/imagenet`): each class is listed once (object stores have no
links, so the link rules do not apply), and each image is read whole with one request.
"""
import os

import numpy as np
from PIL import Image

from mae_jax import config as config_lib
from mae_jax import paths
from mae_jax.data import decode

# torchvision.datasets.folder.IMG_EXTENSIONS: the same files as ImageFolder, so indices agree with it.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class DataError(config_lib.ConfigError):
  """A dataset, split or folder that cannot be used; the message names it (main prints one line)."""


class ArraySource:
  """In-memory images (N, H, W, 3) uint8 and labels (N,)."""

  def __init__(self, images, labels, num_classes, name='array'):
    self.images, self.labels, self.num_classes, self.name = images, labels, num_classes, name

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return decode.check_image_array(self.images[index]), int(self.labels[index])

  def describe(self, index):
    return f'{self.name}[{index}]'


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
    raise DataError(f"config.data: the embedded dataset 'digits' has splits 'train' and 'test', not {split!r}")
  scans = (digits.images[chosen[split]] * (255.0 / 16.0)).round().astype(np.uint8)
  images = np.stack([np.asarray(Image.fromarray(s).resize((size, size), Image.BICUBIC)) for s in scans])
  return ArraySource(np.repeat(images[..., None], 3, axis=-1), digits.target[chosen[split]], num_classes=10,
                     name=f'digits/{split}')


EMBEDDED = {'digits': embedded_digits}


def _visible_dirs(path):
  if paths.is_remote(path):
    return sorted(name for name in paths.subdirs(path) if not name.startswith('.'))
  with os.scandir(path) as entries:
    return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))


def _class_files(class_dir):
  """(paths, ignored) of one class folder's image files, in (folder, name) order. Links to folders are followed
  only to folders inside the class not seen yet (no loops, no parent's images under this label); hidden names
  and anything but regular files (FIFOs, sockets, devices would block or fail a decode) are ignored."""
  if paths.is_remote(class_dir):
    return _bucket_class_files(class_dir)
  root = os.path.realpath(class_dir)
  seen, pending, linked, found, ignored = set(), [class_dir], [], [], 0
  while pending or linked:  # real folders first, then links in name order: the same paths on every filesystem
    if not pending:
      linked.sort()
    folder = pending.pop() if pending else linked.pop(0)
    real = os.path.realpath(folder)
    if real in seen or (real != root and not real.startswith(root + os.sep)):
      continue
    seen.add(real)
    with os.scandir(folder) as entries:
      for entry in entries:
        if entry.name.startswith('.'):
          ignored += not entry.is_dir()
        elif entry.is_dir():
          (linked if entry.is_symlink() else pending).append(entry.path)
        elif entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
          found.append((folder, entry.name))
        else:
          ignored += 1
  return [os.path.join(folder, name) for folder, name in sorted(found)], ignored


def _bucket_class_files(class_dir):
  """`_class_files` of a class folder in a bucket: one listing of its prefix."""
  found, ignored = [], 0
  for path, _ in paths.walk_files(class_dir):
    hidden = any(part.startswith('.') for part in path[len(class_dir.rstrip('/')) + 1:].split('/'))
    if not hidden and path.lower().endswith(IMG_EXTENSIONS):
      found.append(path)
    else:
      ignored += 1
  return sorted(found, key=lambda p: tuple(p.rsplit('/', 1))), ignored


class FolderSource:
  """`root/<split>/<class>/...` image files. Classes are the sorted class folders of `class_split` (the
  training split), so every split labels a class alike; a class folder of another split that the
  training split lacks is an error."""

  def __init__(self, root, split, class_split=None, max_pixels=decode.DEFAULT_MAX_PIXELS):
    self.root, self.split, self.max_pixels = root, split, max_pixels
    self.directory = paths.join(root, split)
    if paths.is_remote(root):
      paths.check_remote(root, f'config.data.name={root}')
    if not paths.isdir(root):
      raise DataError(f"config.data.name={root!r}: the image folder root does not exist (source='folder')")
    if not paths.isdir(self.directory):
      found = _visible_dirs(root)
      raise DataError(f'image folder split {split!r} not found: {self.directory} does not exist '
                      f'(folders in {root}: {found[:10]})')
    self.classes = _visible_dirs(self.directory)
    if class_split and class_split != split:
      train_dir = paths.join(root, class_split)
      train_classes = _visible_dirs(train_dir) if paths.isdir(train_dir) else self.classes
      unknown = sorted(set(self.classes) - set(train_classes))
      if unknown:
        raise DataError(f'{self.directory} has class folders that the training split {train_dir} lacks: {unknown[:5]}')
      self.classes = train_classes
    if not self.classes:
      raise DataError(f'no class folders in {self.directory}: expected {self.directory}/<class>/<image files>')
    self.num_classes = len(self.classes)
    relative, labels, self.ignored_files, empty = [], [], 0, []
    for label, name in enumerate(self.classes):
      class_dir = paths.join(self.directory, name)
      files, ignored = _class_files(class_dir) if paths.isdir(class_dir) else ([], 0)
      relative += [path[len(self.directory.rstrip('/')) + 1:] if paths.is_remote(path)
                   else os.path.relpath(path, self.directory) for path in files]
      labels += [label] * len(files)
      self.ignored_files += ignored
      if not files and paths.isdir(class_dir):
        empty.append(name)
    if empty and relative:  # a label no example has: a typo'd folder or a failed copy, mostly
      print(f'WARNING: {len(empty)} class folder(s) of {self.directory} hold no image files: {empty[:10]}'
            f'{" ..." if len(empty) > 10 else ""}; their labels are kept', flush=True)
    if not relative:
      raise DataError(f'no image files ({", ".join(IMG_EXTENSIONS)}) under {self.directory}/<class>/')
    # Fixed-width bytes: ~40 B per ImageNet path instead of ~110 B for a Python str (1.28M paths: 50 MB).
    self._paths = np.array([os.fsencode(p) for p in relative])
    self.labels = np.asarray(labels, np.int32)

  def __len__(self):
    return len(self._paths)

  def path(self, index):
    return paths.join(self.directory, os.fsdecode(self._paths[index]))

  def __getitem__(self, index):
    file = self.path(index)
    if paths.is_remote(file):
      try:
        file = paths.read_bytes(file)
      except OSError as e:
        raise decode.BadImage(f'unreadable: {e}') from None
    return decode.open_rgb(file, self.max_pixels), int(self.labels[index])

  def describe(self, index):
    return self.path(index)


def _tfds_prepare_hint(name, data_dir):
  target = f' --data_dir={data_dir}' if data_dir else ''
  manual = ' --manual_dir=<dir with ILSVRC2012_img_{train,val}.tar>' if name.split('/')[0].split(':')[0] == 'imagenet2012' else ''
  return f'prepare it once with: tfds build {name}{manual}{target} --file_format=array_record (see docs/data.md)'


class TfdsSource:
  """A prepared TFDS dataset split, read with `tfds.data_source` (array_record random access; no TensorFlow).

  The image feature is read as raw bytes (SkipDecoding) and decoded here, so undecodable records are
  counted and replaced like bad files of a folder.
  """

  def __init__(self, name, split, data_dir='', image_key='image', label_key='label',
               max_pixels=decode.DEFAULT_MAX_PIXELS):
    import tensorflow_datasets as tfds  # late: only this source needs it
    self.name, self.split, self.max_pixels = name, split, max_pixels
    where = data_dir or os.environ.get('TFDS_DATA_DIR', '')  # TFDS reads gs:// itself; its errors would be retries
    if paths.is_remote(where):
      paths.check_remote(where, f'config.data.data_dir={where}' if data_dir else f'TFDS_DATA_DIR={where}')
    self.image_key, self.label_key = image_key, label_key
    try:
      builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # DatasetNotFoundError lists every registered dataset: keep the first line
      raise DataError(f'config.data.name={name!r}: TFDS dataset not found in '
                      f'{data_dir or "the default data_dir"}: {str(e).splitlines()[0]}') from None
    where = builder.data_dir
    if not builder.is_prepared():
      raise DataError(f'TFDS dataset {name!r} is not prepared in {where}; {_tfds_prepare_hint(name, data_dir)}')
    file_format = str(getattr(builder.info.file_format, 'value', builder.info.file_format))
    if file_format not in ('array_record', 'parquet'):
      raise DataError(f'TFDS dataset {name!r} in {where} is stored as {file_format}, which has no random access; '
                      f'{_tfds_prepare_hint(name, data_dir)}, or convert it with: tfds convert_format '
                      f'--dataset_version_dir={where} --out_file_format=array_record')
    features = builder.info.features
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
      images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
      raise DataError(f'config.data.image_key={image_key!r} is not an image feature of {name!r}; its image '
                      f'features: {images}')
    if label_key and label_key not in features:
      raise DataError(f'config.data.label_key={label_key!r} is not a feature of {name!r} ({sorted(features)}); '
                      "set config.data.label_key='' for unlabelled data")
    self.num_classes = getattr(features[label_key], 'num_classes', None) if label_key else 1
    if label_key and not self.num_classes:
      raise DataError(f'config.data.label_key={label_key!r} of {name!r} is not a ClassLabel')
    try:
      self.data = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except ValueError as e:  # unknown split
      raise DataError(f'config.data: TFDS dataset {name!r}: {e}') from None
    if not len(self.data):
      raise DataError(f'TFDS dataset {name!r} split {split!r} in {where} is empty')
    self._file_names = 'file_name' in features

  def __len__(self):
    return len(self.data)

  def __getitem__(self, index):
    try:
      example = self.data[int(index)]
    except Exception as e:  # a record that does not parse
      raise decode.BadImage(f'unreadable record: {type(e).__name__}: {e}') from None
    label = int(example[self.label_key]) if self.label_key else 0
    return decode.open_rgb(example[self.image_key], self.max_pixels), label

  def describe(self, index):
    description = f'{self.name}/{self.split}[{index}]'
    if self._file_names:
      try:
        file_name = self.data[int(index)]['file_name']
        description += f' ({file_name.decode() if isinstance(file_name, bytes) else file_name})'
      except Exception:  # pylint: disable=broad-except
        pass
    return description


def create(data_config, split, class_split=None):
  """The source named by `config.data` for `split` (`class_split`: the split whose classes define labels)."""
  source, name = data_config.source, data_config.name
  if not split:
    raise DataError('config.data: the split name is empty')
  if source == 'embedded':
    if name not in EMBEDDED:
      raise DataError(f'config.data.name={name!r}: embedded datasets are {sorted(EMBEDDED)}')
    return EMBEDDED[name](split)
  if source == 'folder':
    return FolderSource(name if paths.is_remote(name) else os.path.expanduser(name), split, class_split,
                        data_config.max_pixels)
  if source == 'tfds':
    return TfdsSource(name, split, data_config.data_dir, data_config.image_key, data_config.label_key,
                      data_config.max_pixels)
  raise DataError(f'config.data.source={source!r} is not one of embedded, folder, tfds')
