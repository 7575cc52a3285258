"""RandAugment and random erasing as timm applies them in MAE's fine-tuning, every draw from a NumPy Generator.

MAE fine-tunes with `timm.data.create_transform(..., auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
re_prob=0.25, re_mode='pixel', re_count=1)`. That is, per image:
  RandAugment  2 ops chosen uniformly with replacement from the 15 'increasing' ops; each applied with
               probability 0.5 at magnitude N(9, 0.5) clipped to [0, 10] (in tenths of the op's range), with a
               random sign for the geometric and enhance ops; geometric ops fill with the ImageNet mean in
               uint8, (124, 116, 104), and resample bicubically;
  erasing      after normalisation, with probability 0.25 one box of area U(0.02, 1/3) of the image and
               log-uniform aspect in (0.3, 1/0.3) (10 tries to fit) is replaced by N(0, 1) noise per pixel.
The op definitions and level-to-argument maps are timm's (timm/data/auto_augment.py, random_erasing.py); the
draws come from the caller's Generator in the order timm's python `random` makes them, so a Generator seeded
per (seed, step, example) makes the augmentation a pure function of those.
"""
import math
import re

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mae_jax.config import IMAGENET_MEAN

LEVEL_DENOM = 10.0  # 'm' magnitudes are tenths of an op's full range


def _affine(img, matrix, fill, resample):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _rotate(img, degrees, fill, resample):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def _shear_x(img, factor, fill, resample):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x_rel(img, pct, fill, resample):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def _translate_y_rel(img, pct, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def _solarize_add(img, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _posterize(img, bits):
  if bits <= 0:  # no bit kept (PosterizeIncreasing at m = 10): black, as Pillow did before it began to raise
    return Image.new(img.mode, img.size)
  return img if bits >= 8 else ImageOps.posterize(img, bits)


def _enhance(kind):
  return lambda img, factor: kind(img).enhance(factor)


def _enhance_level(f, _):
  return f * 1.8 + 0.1,  # [0.1, 1.9]


def _enhance_increasing_level(f, sign):
  return max(0.1, 1.0 + sign * (f * 0.9)),  # 1.0 is 'no change'; the sign blends towards 0 or 2


def _signed_level(scale):
  return lambda f, sign: (sign * (f * scale),)


# name: (op, level(fraction, sign) -> op args or None, signed, geometric). `fraction` is magnitude / 10;
# signed ops draw a sign; geometric ops also take the fill colour and the resampling filter.
_OPS = {
    'AutoContrast': (ImageOps.autocontrast, None, False, False),
    'Equalize': (ImageOps.equalize, None, False, False),
    'Invert': (ImageOps.invert, None, False, False),
    'Rotate': (_rotate, _signed_level(30.0), True, True),
    'Posterize': (_posterize, lambda f, _: (int(f * 4),), False, False),
    'PosterizeIncreasing': (_posterize, lambda f, _: (4 - int(f * 4),), False, False),
    'Solarize': (ImageOps.solarize, lambda f, _: (min(256, int(f * 256)),), False, False),
    'SolarizeIncreasing': (ImageOps.solarize, lambda f, _: (256 - min(256, int(f * 256)),), False, False),
    'SolarizeAdd': (_solarize_add, lambda f, _: (min(128, int(f * 110)),), False, False),
    'Color': (_enhance(ImageEnhance.Color), _enhance_level, False, False),
    'ColorIncreasing': (_enhance(ImageEnhance.Color), _enhance_increasing_level, True, False),
    'Contrast': (_enhance(ImageEnhance.Contrast), _enhance_level, False, False),
    'ContrastIncreasing': (_enhance(ImageEnhance.Contrast), _enhance_increasing_level, True, False),
    'Brightness': (_enhance(ImageEnhance.Brightness), _enhance_level, False, False),
    'BrightnessIncreasing': (_enhance(ImageEnhance.Brightness), _enhance_increasing_level, True, False),
    'Sharpness': (_enhance(ImageEnhance.Sharpness), _enhance_level, False, False),
    'SharpnessIncreasing': (_enhance(ImageEnhance.Sharpness), _enhance_increasing_level, True, False),
    'ShearX': (_shear_x, _signed_level(0.3), True, True),
    'ShearY': (_shear_y, _signed_level(0.3), True, True),
    'TranslateXRel': (_translate_x_rel, _signed_level(0.45), True, True),  # timm's default translate_pct
    'TranslateYRel': (_translate_y_rel, _signed_level(0.45), True, True),
}

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
       'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
INCREASING_OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
                  'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                  'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def mean_fill(mean):
  """The uint8 fill colour of the geometric ops: timm's `img_mean` hparam, round(255 * mean)."""
  return tuple(min(255, round(255 * x)) for x in mean)


def is_signed(name):
  return _OPS[name][2]


def apply_op(name, img, magnitude, sign=1, fill=mean_fill(IMAGENET_MEAN), resample=Image.BICUBIC):
  """`name` at `magnitude` (0..10, already clipped) with `sign` (+1 or -1, used by signed ops) on a PIL image."""
  fn, level_fn, _, geometric = _OPS[name]
  args = level_fn(magnitude / LEVEL_DENOM, sign) if level_fn is not None else ()
  return fn(img, *args, fill, resample) if geometric else fn(img, *args)


class RandAugment:
  """timm's `RandAugment(rand_augment_ops(magnitude, prob, hparams, ops), num_layers)` on PIL images.

  magnitude_std: std of the per-op gaussian noise on the magnitude; inf draws it uniformly from [0, magnitude].
  magnitude_max: the clip of the noisy magnitude (timm's 'mmax', default 10).
  """

  def __init__(self, num_layers=2, magnitude=9, magnitude_std=0.5, magnitude_max=LEVEL_DENOM, prob=0.5,
               increasing=True, mean=IMAGENET_MEAN, interpolation='bicubic'):
    self.num_layers, self.magnitude, self.prob = num_layers, magnitude, prob
    self.magnitude_std, self.magnitude_max = magnitude_std, magnitude_max
    self.ops = INCREASING_OPS if increasing else OPS
    self.fill, self.resample = mean_fill(mean), Image.Resampling[interpolation.upper()]

  def sample(self, rng):
    """[(name, magnitude, sign)] of the ops that this draw applies, in order.

    timm's draws: the ops (np.random.choice with replacement), then per op: skip unless random() <= prob,
    the noisy magnitude (drawn for every applied op, used or not), its clip, the sign (random() > 0.5: -1).
    """
    applied = []
    for index in rng.integers(0, len(self.ops), size=self.num_layers):
      name = self.ops[index]
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std == math.inf:
        magnitude = rng.uniform(0, magnitude)
      elif self.magnitude_std > 0:
        magnitude = rng.normal(magnitude, self.magnitude_std)
      magnitude = max(0.0, min(float(magnitude), self.magnitude_max))
      sign = -1 if is_signed(name) and rng.random() > 0.5 else 1
      applied.append((name, magnitude, sign))
    return applied

  def __call__(self, img, rng):
    for name, magnitude, sign in self.sample(rng):
      img = apply_op(name, img, magnitude, sign, self.fill, self.resample)
    return img


def from_timm_string(config_str, mean=IMAGENET_MEAN, interpolation='bicubic'):
  """RandAugment from timm's `rand_augment_transform` string, e.g. 'rand-m9-mstd0.5-inc1'.

  Sections: m (magnitude, int), n (ops per image), p (prob per op), mstd (magnitude noise; > 100 = uniform),
  mmax (magnitude clip), inc (1: the increasing op set). timm's translate_const (from the image size) is only
  used by the absolute translations, which no RandAugment op set contains, so the size is not needed.
  """
  sections = config_str.split('-')
  if sections[0] != 'rand':
    raise ValueError(f'{config_str!r}: only RandAugment strings (rand-...) are supported')
  kwargs = dict(num_layers=2, magnitude=int(LEVEL_DENOM), magnitude_std=0.0, magnitude_max=LEVEL_DENOM,
                prob=0.5, increasing=False)
  parse = {'m': ('magnitude', int), 'n': ('num_layers', int), 'p': ('prob', float),
           'mstd': ('magnitude_std', lambda v: math.inf if float(v) > 100 else float(v)),
           'mmax': ('magnitude_max', int), 'inc': ('increasing', lambda v: bool(int(v)))}
  for section in sections[1:]:
    key, value = (re.split(r'(\d.*)', section) + [''])[:2]
    if key not in parse or not value:
      raise ValueError(f'{config_str!r}: unknown or unsupported RandAugment section {section!r} '
                       f'(supported: {", ".join(parse)})')
    field, convert = parse[key]
    kwargs[field] = convert(value)
  return RandAugment(mean=mean, interpolation=interpolation, **kwargs)


class RandomErasing:
  """timm's `RandomErasing(probability, mode, max_count)` on one normalised (H, W, C) float32 image, in place.

  With `probability`, `count` boxes (1, or uniform in 1..max_count) each of area U(min_area, max_area) * area /
  count and aspect h / w log-uniform in (min_aspect, 1 / min_aspect), placed uniformly where h < H and w < W
  (10 tries per box, else that box is skipped), get per-pixel N(0, 1) ('pixel'), one N(0, 1) colour ('rand')
  or zeros ('const').
  """

  def __init__(self, probability=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None,
               mode='pixel', max_count=1):
    if mode not in ('pixel', 'rand', 'const'):
      raise ValueError(f'random erasing mode {mode!r}: one of pixel, rand, const')
    self.probability, self.min_area, self.max_area = probability, min_area, max_area
    self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    self.mode, self.max_count = mode, max_count

  def boxes(self, rng, height, width):
    """[(top, left, h, w)] of the boxes this draw erases."""
    if rng.random() > self.probability:
      return []
    count = 1 if self.max_count == 1 else int(rng.integers(1, self.max_count + 1))
    boxes = []
    for _ in range(count):
      for _ in range(10):
        target_area = rng.uniform(self.min_area, self.max_area) * height * width / count
        aspect = math.exp(rng.uniform(*self.log_aspect))
        h, w = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
          boxes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
          break
    return boxes

  def __call__(self, image, rng):
    height, width, channels = image.shape
    for top, left, h, w in self.boxes(rng, height, width):
      if self.mode == 'pixel':
        fill = rng.standard_normal((h, w, channels), dtype=np.float32)
      elif self.mode == 'rand':
        fill = rng.standard_normal((1, 1, channels), dtype=np.float32)
      else:
        fill = 0.0
      image[top:top + h, left:left + w] = fill
    return image
