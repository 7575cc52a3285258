"""Unpacks the ImageNet-1k (ILSVRC2012) download into the image-folder layout `root/{train,val}/<wnid>/*.JPEG`.

  python -m mae_jax.data.imagenet_folder --manual_dir=DIR_WITH_TARS --out=/data/imagenet

Reads ILSVRC2012_img_train.tar (1000 per-class tars inside) and ILSVRC2012_img_val.tar (50,000 files, labelled
with TFDS's validation_labels.txt: the wnid of each file in sorted-name order) from `--manual_dir`. The folder
labels (sorted wnids) are the same integers as TFDS imagenet2012's. Streams the tars: no double disk space.
"""
import argparse
import os
import sys
import tarfile


def validation_wnids():
  """The wnid of every ILSVRC2012_val_*.JPEG in sorted-name order (shipped with tensorflow-datasets)."""
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(imagenet_common.__file__), 'validation_labels.txt')
  with open(path) as f:
    return f.read().split()


def _write(member_file, path):
  with open(path + '.partial', 'wb') as out:
    while chunk := member_file.read(1 << 20):
      out.write(chunk)
  os.replace(path + '.partial', path)  # an interrupted run leaves no truncated image behind


def unpack_train(tar_path, out_dir, log=print):
  count = 0
  with tarfile.open(tar_path, mode='r|') as outer:
    for class_tar in outer:
      if not class_tar.isfile() or not class_tar.name.endswith('.tar'):
        continue
      wnid = os.path.basename(class_tar.name)[:-4]
      class_dir = os.path.join(out_dir, 'train', wnid)
      os.makedirs(class_dir, exist_ok=True)
      with tarfile.open(fileobj=outer.extractfile(class_tar), mode='r|') as inner:
        for image in inner:
          if image.isfile():
            _write(inner.extractfile(image), os.path.join(class_dir, os.path.basename(image.name)))
            count += 1
      log(f'train/{wnid}: {count} images so far')
  return count


def unpack_val(tar_path, out_dir, wnids=None):
  wnids = wnids or validation_wnids()
  with tarfile.open(tar_path, mode='r:') as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: os.path.basename(m.name))
    if len(members) != len(wnids):
      raise ValueError(f'{tar_path} has {len(members)} files, the validation labels {len(wnids)}')
    for member, wnid in zip(members, wnids):
      class_dir = os.path.join(out_dir, 'val', wnid)
      os.makedirs(class_dir, exist_ok=True)
      _write(tar.extractfile(member), os.path.join(class_dir, os.path.basename(member.name)))
  return len(members)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--manual_dir', required=True, help='directory with ILSVRC2012_img_{train,val}.tar')
  parser.add_argument('--out', required=True, help='image-folder root to create (config.data.name)')
  parser.add_argument('--splits', default='train,val')
  args = parser.parse_args(argv)
  for split in args.splits.split(','):
    tar_path = os.path.join(args.manual_dir, f'ILSVRC2012_img_{split}.tar')
    if not os.path.exists(tar_path):
      sys.exit(f'imagenet_folder: error: {tar_path} not found')
    count = (unpack_train if split == 'train' else unpack_val)(tar_path, args.out)
    print(f'{split}: {count} images in {os.path.join(args.out, split)}', flush=True)


if __name__ == '__main__':
  main()
