"""Per-image augmentation with PIL and an explicit NumPy RNG (deterministic per step and example).

Training is torchvision's `RandomResizedCrop(size, scale, ratio, interpolation)` (10 tries at a random
area and log-uniform aspect ratio, else a centre crop clamped to the ratio range; crop, then resize with
PIL) + `RandomHorizontalFlip()` + `ToTensor()` + `Normalize(mean, std)`, with the layout kept HWC:

  MAE, GAN-MAE, MR-MAE  224 px, scale (0.2, 1), bicubic, ImageNet mean/std
  MAGE                  256 px, scale (0.2, 1), bilinear (torchvision's default), mean 0 / std 1 (values in [0, 1])

Evaluation is `Resize(int(size / 0.875), bicubic)` of the short side + `CenterCrop(size)`: 224 -> 256 (MAE),
256 -> 292 (MAGE's `Resize(292)`), rounded down as `int()` does in the references.

Downstream: `FinetuneTransform` is timm's `create_transform(is_training=True, ...)` as MAE's fine-tuning calls it
(bicubic RandomResizedCrop (0.08, 1) + flip + RandAugment 'rand-m9-mstd0.5-inc1' + normalise + random erasing
0.25, randaugment.py); `LinprobeTransform` is MAE's util/crop.RandomResizedCrop (one draw, clamped, no retries)
+ flip + normalise.

MAGE-C's two views are drawn inside the jitted step from the example keys (`contrastive_views`, in jnp), so a
batch stays a pure function of (seed, step) and the loader keeps one image per example.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mae_jax.data.randaugment import RandomErasing, from_timm_string

INTERPOLATIONS = {'bicubic': Image.BICUBIC, 'bilinear': Image.BILINEAR}
EVAL_CROP_FRACTION = 0.875


def random_resized_crop_box(rng, height, width, scale, ratio):
  """(top, left, h, w) of a RandomResizedCrop window, as torchvision draws it."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def eval_resize_size(size, crop_fraction=EVAL_CROP_FRACTION):
  """Short side before the centre crop: int(size / crop_fraction) (224 -> 256, 256 -> 292, 384 -> 438)."""
  return int(size / crop_fraction + 1e-6)  # the epsilon keeps exact quotients exact (224 / 0.875 = 256)


def as_pil(image):
  return image if isinstance(image, Image.Image) else Image.fromarray(image)


class Normalizer:
  """(x / 255 - mean) / std as one multiply-add into a float32 buffer."""

  def __init__(self, mean, std):
    std = np.asarray(std, np.float64)
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.bias = (-np.asarray(mean, np.float64) / std).astype(np.float32)

  def __call__(self, image_uint8, out=None):
    out = np.empty(image_uint8.shape, np.float32) if out is None else out
    np.multiply(image_uint8, self.scale, out=out)
    np.add(out, self.bias, out=out)
    return out


class TrainTransform:

  def __init__(self, data_config):
    self.size = data_config.img_size
    self.scale, self.ratio = tuple(data_config.crop_scale), tuple(data_config.crop_ratio)
    self.hflip = data_config.hflip
    self.resample = INTERPOLATIONS[data_config.get('interpolation', 'bicubic')]
    self.normalize = Normalizer(data_config.mean, data_config.std)

  def crop(self, image, rng):
    """The augmented (size, size, 3) uint8 image."""
    image = as_pil(image)
    top, left, h, w = random_resized_crop_box(rng, image.height, image.width, self.scale, self.ratio)
    out = image.crop((left, top, left + w, top + h)).resize((self.size, self.size), self.resample)
    if self.hflip and rng.random() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)  # in PIL: the array stays contiguous, normalising it is faster
    return np.asarray(out)

  def __call__(self, image, rng, out=None):
    """(size, size, 3) float32, written into `out` when given."""
    return self.normalize(self.crop(image, rng), out)


class EvalTransform:

  def __init__(self, data_config, crop_fraction=EVAL_CROP_FRACTION):
    self.size = data_config.img_size
    self.resize = eval_resize_size(self.size, crop_fraction)
    self.normalize = Normalizer(data_config.mean, data_config.std)

  def crop(self, image):
    image = as_pil(image)
    w, h = image.size
    # torchvision Resize(int): the short side becomes `resize`, the long side int(resize * long / short).
    if w <= h:
      new_w, new_h = self.resize, int(self.resize * h / w)
    else:
      new_w, new_h = int(self.resize * w / h), self.resize
    if (new_w, new_h) != (w, h):
      image = image.resize((new_w, new_h), Image.BICUBIC)
    # torchvision CenterCrop (the resized image is never smaller than the crop).
    top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
    return np.asarray(image.crop((left, top, left + self.size, top + self.size)))

  def __call__(self, image, rng=None, out=None):
    return self.normalize(self.crop(image), out)


def single_sample_crop_box(rng, height, width, scale, ratio):
  """(top, left, h, w) of MAE's util/crop.RandomResizedCrop (TF/BYOL style): one area and log-ratio draw, the
  window clamped to the image (w = min(w, width), h = min(h, height)), then a uniform position; no retries."""
  target_area = height * width * rng.uniform(scale[0], scale[1])
  aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  # max(1, .): an image under 5 pixels would round to an empty window, which the reference cannot resize either
  w = max(1, min(int(round(math.sqrt(target_area * aspect))), width))
  h = max(1, min(int(round(math.sqrt(target_area / aspect))), height))
  return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def crop_resize_flip(image, box, size, resample, flip):
  top, left, h, w = box
  out = as_pil(image).crop((left, top, left + w, top + h)).resize((size, size), resample)
  return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


class FinetuneTransform:
  """MAE's fine-tuning augmentation, timm's `create_transform(is_training=True, auto_augment=randaugment,
  interpolation='bicubic', re_prob=reprob, re_mode=remode, re_count=recount)`: RandomResizedCrop(scale, ratio)
  as torchvision draws it + hflip + RandAugment + normalise + random erasing. All draws from `rng`."""

  def __init__(self, data_config, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), randaugment='rand-m9-mstd0.5-inc1',
               reprob=0.25, remode='pixel', recount=1, interpolation='bicubic'):
    self.size, self.scale, self.ratio = data_config.img_size, tuple(scale), tuple(ratio)
    self.hflip = data_config.hflip
    self.resample = INTERPOLATIONS[interpolation]
    # timm fills the geometric ops with the normalisation mean, in uint8
    self.randaugment = from_timm_string(randaugment, data_config.mean, interpolation) if randaugment else None
    self.erasing = RandomErasing(reprob, mode=remode, max_count=recount) if reprob > 0 else None
    self.normalize = Normalizer(data_config.mean, data_config.std)

  def augment(self, image, rng):
    """The augmented (size, size, 3) uint8 image, before normalisation and erasing."""
    image = as_pil(image)
    box = random_resized_crop_box(rng, image.height, image.width, self.scale, self.ratio)
    out = crop_resize_flip(image, box, self.size, self.resample, self.hflip and rng.random() < 0.5)
    if self.randaugment is not None:
      out = self.randaugment(out, rng)
    return np.asarray(out)

  def __call__(self, image, rng, out=None):
    """(size, size, 3) float32, written into `out` when given."""
    out = self.normalize(self.augment(image, rng), out)
    return out if self.erasing is None else self.erasing(out, rng)


class LinprobeTransform:
  """MAE's linear-probe augmentation: util/crop.RandomResizedCrop(size, scale, ratio, bicubic) (one draw, no
  retries: `single_sample_crop_box`) + hflip + normalise."""

  def __init__(self, data_config, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='bicubic'):
    self.size, self.scale, self.ratio = data_config.img_size, tuple(scale), tuple(ratio)
    self.hflip = data_config.hflip
    self.resample = INTERPOLATIONS[interpolation]
    self.normalize = Normalizer(data_config.mean, data_config.std)

  def crop(self, image, rng):
    image = as_pil(image)
    box = single_sample_crop_box(rng, image.height, image.width, self.scale, self.ratio)
    return np.asarray(crop_resize_flip(image, box, self.size, self.resample, self.hflip and rng.random() < 0.5))

  def __call__(self, image, rng, out=None):
    return self.normalize(self.crop(image, rng), out)


GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _random_view(key, image, scale, ratio, jitter, jitter_prob, grayscale_prob):
  """One view of a [0, 1] image (H, W, 3): a bilinear random resized crop of area fraction U(scale) and
  log-uniform aspect in `ratio` (clamped to the image, one draw), a flip with probability 0.5, then with
  probability `jitter_prob` brightness, contrast and saturation factors U(1 - jitter, 1 + jitter) in that
  order (torchvision's ColorJitter draws the order; hue is left out), then grayscale with `grayscale_prob`."""
  height, width, _ = image.shape
  k = jax.random.split(key, 10)
  area = jax.random.uniform(k[0], minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(k[1], minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  h, w = jnp.minimum(jnp.sqrt(area / aspect), 1.0), jnp.minimum(jnp.sqrt(area * aspect), 1.0)  # fractions
  top, left = jax.random.uniform(k[2]) * (1 - h), jax.random.uniform(k[3]) * (1 - w)
  view = jax.image.scale_and_translate(image, image.shape, (0, 1), jnp.stack([1 / h, 1 / w]),
                                       jnp.stack([-top * height / h, -left * width / w]), 'linear')
  view = jnp.where(jax.random.uniform(k[4]) < 0.5, view[:, ::-1], view)
  gray = lambda x: jnp.sum(x * jnp.asarray(GRAY_WEIGHTS), axis=-1, keepdims=True)
  factor = lambda key: jax.random.uniform(key, minval=1 - jitter, maxval=1 + jitter)
  blend = lambda x, toward, f: jnp.clip((x - toward) * f + toward, 0, 1)  # torchvision's _blend
  jittered = jnp.clip(view * factor(k[5]), 0, 1)
  jittered = blend(jittered, gray(jittered).mean(), factor(k[6]))
  jittered = blend(jittered, gray(jittered), factor(k[7]))
  view = jnp.where(jax.random.uniform(k[8]) < jitter_prob, jittered, view)
  return jnp.where(jax.random.uniform(k[9]) < grayscale_prob, jnp.broadcast_to(gray(view), view.shape), view)


def contrastive_views(example_keys, images, section):
  """Two augmented views (N, H, W, 3) each of [0, 1] images, for MAGE-C (`section`: config.mage.contrastive),
  drawn from the raw example keys (N, 2) folded with 0 and 1: independent of how the batch is split."""
  def views(raw_key, image):
    key = jax.random.wrap_key_data(raw_key)
    draw = lambda i: _random_view(jax.random.fold_in(key, i), image, tuple(section.crop_scale), (3 / 4, 4 / 3),
                                  section.color_jitter, section.color_jitter_prob, section.grayscale_prob)
    return draw(0), draw(1)
  return jax.vmap(views)(example_keys, images.astype(jnp.float32))
