"""The input pipeline: image folders and TFDS datasets with every kind of bad file, torchvision-exact
transforms, determinism (same seed, resume, 2 hosts), and training end to end from a folder and from TFDS."""
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from conftest import load_config, run_main
from PIL import Image

from mae_jax import config as config_lib
from mae_jax import data
from mae_jax.data import decode, loader, sources, transforms

CLASSES = ('cat', 'dog', 'fox')
BATCH = 8
MAX_PIXELS = 1_000_000  # small, so that the "huge" test images stay small on disk


# ----------------------------------------------------------------------------------------------- images

def smooth_image(rng, height, width):
  """A smooth random RGB image (upsampled noise), so JPEG artefacts stay small."""
  small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def png_with_declared_size(width, height):
  """A tiny valid PNG whose header claims width x height: a decompression bomb that costs nothing to store."""
  png = bytearray(encode(Image.new('RGB', (8, 8), (10, 20, 30)), 'PNG'))
  assert png[12:16] == b'IHDR'
  png[16:24] = struct.pack('>II', width, height)
  png[29:33] = struct.pack('>I', zlib.crc32(bytes(png[12:29])) & 0xFFFFFFFF)
  return bytes(png)


def odd_images():
  """Decodable images in every unusual mode: file name -> (bytes, expected (height, width))."""
  rng = np.random.default_rng(1)
  rgb = Image.fromarray(smooth_image(rng, 40, 56))
  palette_alpha = rgb.convert('P')
  palette_alpha.info['transparency'] = 0
  gray16 = Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(48, 40) * 34).astype(np.uint16))
  return {
      'cmyk.jpg': (encode(rgb.convert('CMYK'), 'JPEG'), (40, 56)),
      'gray.jpg': (encode(rgb.convert('L'), 'JPEG'), (40, 56)),
      'palette.png': (encode(rgb.convert('P'), 'PNG'), (40, 56)),
      'palette_alpha.png': (encode(palette_alpha, 'PNG', transparency=0), (40, 56)),
      'rgba.png': (encode(rgb.convert('RGBA'), 'PNG'), (40, 56)),
      'la.png': (encode(rgb.convert('LA'), 'PNG'), (40, 56)),
      'gray16.png': (encode(gray16, 'PNG'), (48, 40)),
      'bitmap.bmp': (encode(rgb, 'BMP'), (40, 56)),
      'one_bit.png': (encode(rgb.convert('1'), 'PNG'), (40, 56)),
      'scan.tiff': (encode(rgb, 'TIFF'), (40, 56)),
      'photo.webp': (encode(rgb, 'WEBP'), (40, 56)),
      'one_pixel.png': (encode(Image.new('RGB', (1, 1), (200, 100, 50)), 'PNG'), (1, 1)),
      # 1600 x 1000 = 1.6 MP > MAX_PIXELS: a JPEG is decoded at half size (DCT scaling), never at full size
      'huge.jpg': (encode(Image.fromarray(smooth_image(rng, 1000, 1600)), 'JPEG', quality=50), (500, 800)),
  }


def bad_images():
  """Files that must be skipped and counted: file name -> (bytes, a word of the expected reason)."""
  good = encode(Image.fromarray(smooth_image(np.random.default_rng(2), 64, 64)), 'JPEG')
  return {
      'corrupt.jpg': (bytes(np.random.default_rng(3).integers(0, 256, 2000, dtype=np.uint8)), 'cannot identify'),
      'truncated.jpg': (good[:len(good) // 2], 'truncated'),
      'empty.jpg': (b'', 'empty'),
      'text_file.png': (b'just some notes, not an image\n' * 20, 'cannot identify'),
      'bomb.png': (png_with_declared_size(40000, 40000), 'large'),
      'huge.png': (encode(Image.new('RGB', (1200, 1000), (1, 2, 3)), 'PNG'), 'max_pixels'),
  }


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """root/{train,test}/{cat,dog,fox}/: good JPEGs of varied sizes, every odd mode, and every bad case.
  The training split has 48 images (6 batches of 8), so one epoch visits every file."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  bad, odd = bad_images(), odd_images()
  files = {f'train/{CLASSES[i % 3]}/{name}': content for i, (name, (content, _)) in enumerate({**odd, **bad}.items())}
  for i in range(48 - len(files)):
    image = smooth_image(rng, int(rng.integers(24, 90)), int(rng.integers(24, 90)))
    files[f'train/{CLASSES[i % 3]}/img_{i:03d}.jpg'] = encode(Image.fromarray(image), 'JPEG', quality=90)
  for i in range(12):
    files[f'test/{CLASSES[i % 3]}/val_{i:03d}.png'] = encode(Image.fromarray(smooth_image(rng, 40, 40)), 'PNG')
  files['test/cat/broken.jpg'] = bad['truncated.jpg'][0]
  files['train/dog/README.txt'] = b'not an image extension: ignored'
  files['train/dog/.hidden.jpg'] = b'hidden: ignored'
  files['train/.ipynb_checkpoints/x.jpg'] = b'hidden folder: ignored'
  for name, content in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(content)
  bad_paths = sorted(str(root / n) for n in files if os.path.basename(n) in bad and n.startswith('train/'))
  return str(root), bad_paths


def folder_config(root, **data):
  config = config_lib.base_config()
  config.data.update(source='folder', name=root, img_size=32, crop_scale=(0.5, 1.0), max_pixels=MAX_PIXELS,
                     num_workers=2, **data)
  config.train.batch_size = BATCH
  return config


# --------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize('name', sorted(odd_images()))
def test_every_image_mode_decodes_to_rgb_uint8(name):
  content, (height, width) = odd_images()[name]
  image = np.asarray(decode.open_rgb(content, MAX_PIXELS))
  assert image.dtype == np.uint8 and image.shape == (height, width, 3)
  assert image.max() > 0


def test_16_bit_grey_is_scaled_not_clipped():
  values = np.array([[0, 255, 256, 0x1234, 65535]], np.uint16)
  image = np.asarray(decode.open_rgb(encode(Image.fromarray(values), 'PNG')))
  np.testing.assert_array_equal(image[0, :, 0], [0, 0, 1, 0x12, 255])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_alpha_is_dropped_like_torchvision():
  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = (30, 60, 90), 0
  image = np.asarray(decode.open_rgb(encode(Image.fromarray(rgba, 'RGBA'), 'PNG')))
  np.testing.assert_array_equal(image[0, 0], (30, 60, 90))


@pytest.mark.parametrize('name', sorted(bad_images()))
def test_bad_files_raise_bad_image_with_the_reason(name):
  content, reason = bad_images()[name]
  t0 = time.time()
  with pytest.raises(decode.BadImage, match=f'(?i){reason}'):
    decode.open_rgb(content, MAX_PIXELS)
  assert time.time() - t0 < 2  # the bomb is refused from its header, never decoded


def test_folder_source_matches_image_folder_layout(image_folder):
  root, _ = image_folder
  source = sources.create(folder_config(root).data, 'train')
  assert source.classes == list(CLASSES) and source.num_classes == 3
  assert len(source) == 48 and source.ignored_files == 2  # README.txt and .hidden.jpg
  datasets = pytest.importorskip('torchvision.datasets')
  reference = datasets.ImageFolder(os.path.join(root, 'train'), allow_empty=True)
  reference_samples = [(p, reference.classes[y]) for p, y in reference.samples if '/.' not in p]  # it lists hidden ones
  assert [(source.path(i), source.classes[source.labels[i]]) for i in range(len(source))] == reference_samples
  test = sources.create(folder_config(root).data, 'test', class_split='train')
  assert test.classes == list(CLASSES) and len(test) == 13


# ------------------------------------------------------------------------------------------- transforms

def torchvision_train(image, seed, data_config):
  """torchvision's pipeline, applied with the crop box and flip that our RNG draws."""
  tf = pytest.importorskip('torchvision.transforms.functional')
  T = pytest.importorskip('torchvision.transforms')
  rng = np.random.default_rng(seed)
  top, left, h, w = transforms.random_resized_crop_box(rng, image.height, image.width, data_config.crop_scale,
                                                       data_config.crop_ratio)
  mode = {'bicubic': T.InterpolationMode.BICUBIC, 'bilinear': T.InterpolationMode.BILINEAR}[data_config.interpolation]
  out = tf.resized_crop(image, top, left, h, w, [data_config.img_size] * 2, mode)
  if rng.random() < 0.5:
    out = tf.hflip(out)
  tensor = tf.normalize(tf.to_tensor(out), data_config.mean, data_config.std)
  return tensor.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('objective', ['mae', 'mage'])
def test_train_transform_is_torchvisions(objective):
  data_config = config_lib.base_config().data
  if objective == 'mage':  # 256 px, bilinear (torchvision's default), [0, 1] values
    data_config.update(img_size=256, interpolation='bilinear', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  transform = transforms.TrainTransform(data_config)
  image = Image.fromarray(smooth_image(np.random.default_rng(5), 375, 500))
  for seed in range(6):
    ours = transform(image, np.random.default_rng(seed))
    assert ours.shape == (data_config.img_size, data_config.img_size, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torchvision_train(image, seed, data_config), atol=2e-5)
    if objective == 'mage':
      assert 0.0 <= ours.min() and ours.max() <= 1.0


def test_eval_transform_is_torchvisions_resize_and_centre_crop():
  T = pytest.importorskip('torchvision.transforms')
  assert transforms.eval_resize_size(224) == 256 and transforms.eval_resize_size(256) == 292  # MAE; MAGE's Resize(292)
  for size in (224, 256):
    data_config = config_lib.base_config().data
    data_config.img_size = size
    reference = T.Compose([T.Resize(transforms.eval_resize_size(size), T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    for height, width in ((375, 500), (500, 333), (301, 257), (size, size), (999, 300)):
      image = Image.fromarray(smooth_image(np.random.default_rng(height), height, width))
      np.testing.assert_array_equal(transforms.EvalTransform(data_config).crop(image), np.asarray(reference(image)))


# ------------------------------------------------------------------------------------------ determinism

def all_batches(train_loader, start, end, prefetch=2):
  return [{k: v.copy() for k, v in batch.items()} for batch in train_loader.iterate(start, end, prefetch)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_same_seed_same_batches_whatever_the_threads(image_folder):
  root, _ = image_folder
  config = folder_config(root)
  first = all_batches(data.train_loader(config), 0, 8)
  config.data.num_workers = 1
  assert_same(first, all_batches(data.train_loader(config), 0, 8, prefetch=0))
  assert all(b['image'].shape == (BATCH, 32, 32, 3) and np.isfinite(b['image']).all() for b in first)
  config.seed = 1
  other = all_batches(data.train_loader(config), 0, 1)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_resuming_at_step_k_gives_the_uninterrupted_batches(image_folder):
  root, _ = image_folder
  config = folder_config(root)
  uninterrupted = all_batches(data.train_loader(config), 0, 14)  # crosses into epoch 2 (6 steps per epoch)
  assert_same(uninterrupted[5:], all_batches(data.train_loader(config), 5, 14))
  assert_same(uninterrupted[9:], all_batches(data.train_loader(config), 9, 14))


def test_two_hosts_get_disjoint_halves_whose_union_is_the_global_batch(image_folder):
  root, _ = image_folder
  config = folder_config(root)
  single = data.train_loader(config)
  hosts = [data.train_loader(config, process_index=p, process_count=2) for p in range(2)]
  epoch_indices = []
  for step, (whole, *halves) in enumerate(zip(single.iterate(0, 6), *(h.iterate(0, 6) for h in hosts))):
    assert all(h['image'].shape[0] == BATCH // 2 for h in halves)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    local = [set(h.local_indices(step).tolist()) for h in hosts]
    assert not local[0] & local[1]
    assert local[0] | local[1] == set(single.global_indices(step).tolist())
    epoch_indices += single.global_indices(step).tolist()
  assert sorted(epoch_indices) == list(range(48))  # one epoch: every example exactly once


def test_bad_examples_are_replaced_deterministically_and_counted(image_folder, capfd):
  root, bad_paths = image_folder
  config = folder_config(root)
  train = data.train_loader(config)
  batches = all_batches(train, 0, 6)  # one epoch: every bad file is met
  assert train.skipped >= len(bad_paths)
  assert sorted(train.source.describe(i) for i in train.bad.bad) == bad_paths
  err = capfd.readouterr().err
  assert err.count('mae_jax: warning: skipping an undecodable image') == loader.SHOWN_BAD
  assert 'further ones are only counted' in err
  # A loader that never saw the bad files (no cache) makes the same batches, step by step.
  for step in (5, 2):
    assert_same(batches[step:step + 1], all_batches(data.train_loader(config), step, step + 1))
  # Each replaced slot holds the next decodable example of the dataset.
  step, slot = next((s, k) for s in range(6) for k, i in enumerate(train.global_indices(s)) if i in train.bad.bad)
  index = int(train.global_indices(step)[slot])
  _, label, used = loader.load_decodable(train.source, index)
  assert used != index and used not in train.bad.bad and batches[step]['label'][slot] == label


def test_evaluation_drops_bad_images_and_counts_them(image_folder):
  root, _ = image_folder
  config = folder_config(root)
  source = data.eval_source(config)
  batches = loader.eval_batches(source, transforms.EvalTransform(config.data), 5)
  labels = np.concatenate([b['label'] for b in batches])
  assert len(labels) == 12 and batches.skipped == 1


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize('name, split, message', [
    ('{root}/nowhere', 'train', 'image folder root does not exist'),
    ('{root}', 'validation', "split 'validation' not found"),
    ('{root}/train/cat', 'x', 'not found'),
])
def test_missing_folder_or_split_is_one_clear_error(image_folder, name, split, message):
  root, _ = image_folder
  with pytest.raises(config_lib.ConfigError, match=message):
    sources.create(folder_config(name.format(root=root)).data, split)


def test_empty_folders_are_clear_errors(tmp_path):
  (tmp_path / 'train').mkdir()
  with pytest.raises(sources.DataError, match='no class folders'):
    sources.create(folder_config(str(tmp_path)).data, 'train')
  (tmp_path / 'train' / 'cat').mkdir()
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('x')
  with pytest.raises(sources.DataError, match='no image files'):
    sources.create(folder_config(str(tmp_path)).data, 'train')


def test_all_bad_data_is_a_clear_error_not_a_hang(tmp_path):
  for i in range(80):
    (tmp_path / 'train' / 'cat').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'train' / 'cat' / f'{i}.jpg').write_bytes(b'')
  train = data.train_loader(folder_config(str(tmp_path)))
  with pytest.raises(sources.DataError, match='consecutive examples .* do not decode'):
    next(train.iterate(0, 1))


TINY = '--config=configs/mae_tiny_cpu.py'


def test_a_missing_dataset_is_one_line_from_main(tmp_path):
  result = run_main(TINY, f'--workdir={tmp_path / "w"}', '--config.data.source=folder',
                    f'--config.data.name={tmp_path}/no')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert f'mae_jax: error: config.data.name=\'{tmp_path}/no\': the image folder root does not exist' in result.stderr


# --------------------------------------------------------------------------------------------------- TFDS

@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  """A small TFDS dataset ('tiny_mae_images': train 40 with bad records, test 9) built as array_record,
  offline and without TensorFlow (images are given as encoded bytes)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  rng = np.random.default_rng(7)
  odd, bad = odd_images(), bad_images()
  odd.pop('huge.jpg')

  class TinyMaeImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(names=list(CLASSES))}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(40, True), 'test': self._generate_examples(9, False)}

    def _generate_examples(self, n, with_bad):
      extra = [content for content, _ in odd.values()]
      extra += [bad[k][0] for k in ('corrupt.jpg', 'truncated.jpg', 'text_file.png')] if with_bad else []
      for i in range(n):
        image = extra[i] if i < len(extra) else encode(Image.fromarray(smooth_image(rng, 48, 64)), 'JPEG')
        yield i, {'image': image, 'label': i % 3}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyMaeImages(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def tfds_config(data_dir, **data_fields):
  config = config_lib.base_config()
  config.data.update({**dict(source='tfds', name='tiny_mae_images', data_dir=data_dir, img_size=32, num_workers=2,
                             eval_split='test'), **data_fields})
  config.train.batch_size = BATCH
  return config


def test_tfds_source_reads_records_and_counts_bad_ones(tfds_dir, capfd):
  config = tfds_config(tfds_dir)
  train = data.train_loader(config)
  assert len(train.source) == 40 and train.source.num_classes == 3
  first = all_batches(train, 0, 5)
  assert train.skipped >= 3 and len(train.bad.bad) == 3
  assert 'tiny_mae_images/train[' in capfd.readouterr().err
  assert_same(first[2:], all_batches(data.train_loader(config), 2, 5))
  hosts = [data.train_loader(config, p, 2) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h.local_batch(3)['image'] for h in hosts]), first[3]['image'])
  assert len(data.eval_source(config)) == 9


@pytest.mark.parametrize('fields, message', [
    (dict(split='validation'), "Unknown split 'validation'"),
    (dict(name='no_such_dataset_xyz'), 'TFDS dataset not found'),
    (dict(name='mnist'), "'mnist' is not prepared in .*tfds build mnist"),
    (dict(image_key='picture'), "image_key='picture' is not an image feature"),
])
def test_tfds_mistakes_are_clear_errors(tfds_dir, fields, message):
  split = fields.pop('split', 'train')
  config = tfds_config(tfds_dir, **fields)
  with pytest.raises(config_lib.ConfigError, match=message):
    sources.create(config.data, split)


# -------------------------------------------------------------------------------------- training end to end

def training_args(workdir, steps):
  return [f'--workdir={workdir}', f'--config.train.num_steps={steps}', f'--config.train.batch_size={BATCH}',
          '--config.log.every_steps=1', '--config.eval.knn_batch_size=16', '--config.checkpoint.every_steps=1000']


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_training_from_an_image_folder_with_bad_files(image_folder, tmp_path):
  root, bad_paths = image_folder
  workdir = tmp_path / 'run'
  result = run_main(TINY, *training_args(workdir, 6), '--config.data.source=folder', f'--config.data.name={root}',
                    f'--config.data.max_pixels={MAX_PIXELS}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count('mae_jax: warning: skipping an undecodable') >= loader.SHOWN_BAD
  assert 'data/skipped' in result.stdout and 'knn/top1 on' in result.stdout  # the kNN evaluator ran
  skipped = [r['data/skipped'] for r in read_metrics(workdir) if 'data/skipped' in r]
  assert skipped[-1] >= len(bad_paths)  # one epoch: every bad file met (and counted) at least once


@pytest.mark.slow
def test_training_from_tfds_in_process(tfds_dir, tmp_path, capsys):
  from mae_jax import metrics, train  # pylint: disable=g-import-not-at-top
  config = load_config('mae_tiny_cpu')
  config.data.update(source='tfds', name='tiny_mae_images', data_dir=tfds_dir, eval_split='')  # kNN: folder test
  config.train.update(num_steps=5, batch_size=BATCH)
  config.log.every_steps = 1
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'Done: 5 steps' in capsys.readouterr().out
  skipped = [r['data/skipped'] for r in metrics.read_jsonl(str(tmp_path / 'run')) if 'data/skipped' in r]
  assert skipped and skipped[-1] >= 3  # one epoch (40 records, 5 x 8): the 3 bad records met at least once


def test_imagenet_tars_unpack_into_the_folder_layout(tmp_path):
  from mae_jax.data import imagenet_folder
  import tarfile

  def add(tar, name, content):
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))

  jpeg = encode(Image.fromarray(smooth_image(np.random.default_rng(0), 30, 40)), 'JPEG')
  with tarfile.open(tmp_path / 'ILSVRC2012_img_train.tar', 'w') as outer:
    for wnid in ('n01440764', 'n01443537'):
      buffer = io.BytesIO()
      with tarfile.open(fileobj=buffer, mode='w') as inner:
        for k in range(2):
          add(inner, f'{wnid}_{k}.JPEG', jpeg)
      add(outer, f'{wnid}.tar', buffer.getvalue())
  with tarfile.open(tmp_path / 'ILSVRC2012_img_val.tar', 'w') as tar:
    for k in (2, 1, 3):
      add(tar, f'ILSVRC2012_val_{k:08d}.JPEG', jpeg)
  out = tmp_path / 'imagenet'
  assert imagenet_folder.unpack_train(str(tmp_path / 'ILSVRC2012_img_train.tar'), str(out), log=lambda _: None) == 4
  assert imagenet_folder.unpack_val(str(tmp_path / 'ILSVRC2012_img_val.tar'), str(out),
                                    wnids=['n01443537', 'n01440764', 'n01443537']) == 3
  assert sorted(os.listdir(out / 'val' / 'n01443537')) == ['ILSVRC2012_val_00000001.JPEG', 'ILSVRC2012_val_00000003.JPEG']
  config = folder_config(str(out))
  assert len(sources.create(config.data, 'train')) == 4
  assert sources.create(config.data, 'val', class_split='train').classes == ['n01440764', 'n01443537']
  wnids = imagenet_folder.validation_wnids()
  assert len(wnids) == 50000 and wnids[0] == 'n01751748'
