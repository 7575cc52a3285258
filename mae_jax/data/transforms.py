"""Per-image augmentation in NumPy/PIL with an explicit RNG (deterministic per step and index).

Training: torchvision's RandomResizedCrop semantics (10 tries at a random area and log-uniform aspect
ratio, else a centre crop clamped to the ratio range), bicubic resize, horizontal flip, then mean/std
normalisation. Evaluation: resize the short side to size/0.875 and centre-crop (256 -> 224).
"""
import math

import numpy as np
from PIL import Image


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
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def normalize(image_uint8, mean, std):
  return (image_uint8.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class TrainTransform:

  def __init__(self, data_config):
    self.size = data_config.img_size
    self.scale, self.ratio = tuple(data_config.crop_scale), tuple(data_config.crop_ratio)
    self.hflip, self.mean, self.std = data_config.hflip, data_config.mean, data_config.std

  def __call__(self, image, rng):
    top, left, h, w = random_resized_crop_box(rng, image.shape[0], image.shape[1], self.scale, self.ratio)
    crop = Image.fromarray(image).resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + w, top + h))
    out = np.asarray(crop)
    if self.hflip and rng.random() < 0.5:
      out = out[:, ::-1]
    return normalize(out, self.mean, self.std)


class EvalTransform:

  def __init__(self, data_config, crop_fraction=0.875):
    self.size, self.mean, self.std = data_config.img_size, data_config.mean, data_config.std
    self.resize = int(round(self.size / crop_fraction))

  def __call__(self, image, rng=None):
    h, w = image.shape[:2]
    scale = self.resize / min(h, w)
    resized = Image.fromarray(image).resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))),
                                            Image.BICUBIC)
    left, top = (resized.width - self.size) // 2, (resized.height - self.size) // 2
    crop = np.asarray(resized.crop((left, top, left + self.size, top + self.size)))
    return normalize(crop, self.mean, self.std)
