"""Default configuration and its validation.

Every field exists here with a default (MAE's ViT-B recipe); `configs/*.py` only override. The config
is validated before anything is built or compiled, so a wrong value is one clear message.
"""
import ml_collections

from mae_jax.models import vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SOURCES = ('embedded', 'tfds', 'folder')
DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


def base_config():
  c = ml_collections.ConfigDict()
  c.objective = 'mae'
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      variant='B/16',          # <size>/<patch>; sizes: pico, nano (tests), Ti, S, B, L, H
      mlp_ratio=4.0,
      drop_path_rate=0.0,      # MAE pretraining uses none
      dropout=0.0,
      dtype='float32',         # compute dtype; parameters stay float32, attention softmax is float32
      remat=False,             # rematerialise transformer blocks (trade compute for memory)
      decoder=dict(width=512, depth=8, num_heads=16),
  ))

  c.mae = ml_collections.ConfigDict(dict(mask_ratio=0.75, norm_pix_loss=True))

  c.data = ml_collections.ConfigDict(dict(
      source='embedded',       # embedded | tfds | folder
      name='digits',           # embedded dataset name, TFDS name, or image-folder root
      data_dir='',             # TFDS data dir
      train_split='train',
      eval_split='test',       # labelled split for kNN ('' disables kNN)
      img_size=224,
      crop_scale=(0.2, 1.0),   # RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + flip
      crop_ratio=(3 / 4, 4 / 3),
      hflip=True,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      prefetch=2,              # batches prepared ahead on a background thread
  ))

  c.train = ml_collections.ConfigDict(dict(
      batch_size=4096,         # global batch; lr = blr * batch_size / 256
      epochs=800,
      warmup_epochs=40,
      blr=1.5e-4,
      min_lr=0.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.95,
      num_steps=-1,            # > 0 overrides epochs (for smoke tests and benchmarks)
      grad_accum_steps=1,      # micro-batches per step: the paper's batch of 4096 on fewer devices
  ))

  # Device mesh: -1 fills the remaining devices. Arrays of at least fsdp_min_size_mb are sharded over 'fsdp'.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size_mb=4.0))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))

  c.log = ml_collections.ConfigDict(dict(
      every_steps=50,
      images_every_steps=1000,  # TensorBoard grid of original | masked | reconstruction
      num_images=8,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      knn_every_steps=0,       # 0: only before training and at the end
      knn_k=20,
      knn_temperature=0.07,
      knn_batch_size=256,
  ))
  return c


def _require(ok, message):
  if not ok:
    raise ConfigError(message)


def validate(config):
  """Checks every value that would otherwise fail late or silently; raises ConfigError."""
  from mae_jax import objectives  # late: objectives import models, which import this module's users
  _require(config.objective in objectives.OBJECTIVES,
           f'config.objective={config.objective!r} is not one of {sorted(objectives.OBJECTIVES)}')
  try:
    patch = vit.parse_variant(config.model.variant)['patch_size']
  except ValueError as e:
    raise ConfigError(f'config.model.variant: {e}') from None
  _require(config.data.img_size > 0 and config.data.img_size % patch == 0,
           f'config.data.img_size={config.data.img_size} must be a positive multiple of the patch size {patch}')
  _require(config.model.dtype in DTYPES, f'config.model.dtype={config.model.dtype!r} is not one of {DTYPES}')
  _require(0.0 <= config.model.drop_path_rate < 1.0, 'config.model.drop_path_rate must be in [0, 1)')
  _require(0.0 < config.mae.mask_ratio < 1.0, f'config.mae.mask_ratio={config.mae.mask_ratio} must be in (0, 1)')
  _require(config.data.source in DATA_SOURCES,
           f'config.data.source={config.data.source!r} is not one of {DATA_SOURCES}')
  lo, hi = config.data.crop_scale
  _require(0.0 < lo <= hi <= 1.0, f'config.data.crop_scale={tuple(config.data.crop_scale)} must satisfy 0 < lo <= hi <= 1')
  _require(len(config.data.mean) == 3 and len(config.data.std) == 3 and min(config.data.std) > 0,
           'config.data.mean and config.data.std need three values, std > 0')
  t = config.train
  _require(t.batch_size > 0, f'config.train.batch_size={t.batch_size} must be positive')
  _require(t.grad_accum_steps >= 1, f'config.train.grad_accum_steps={t.grad_accum_steps} must be >= 1')
  _require(t.num_steps > 0 or t.epochs > 0, 'set config.train.epochs > 0 or config.train.num_steps > 0')
  _require(0 <= t.warmup_epochs and (t.num_steps > 0 or t.warmup_epochs < t.epochs),
           f'config.train.warmup_epochs={t.warmup_epochs} must be in [0, epochs={t.epochs})')
  _require(t.blr > 0 and t.min_lr >= 0 and t.weight_decay >= 0, 'config.train: blr > 0, min_lr >= 0, weight_decay >= 0')
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, 'config.train.b1 and b2 must be in [0, 1)')
  for axis in ('data', 'fsdp'):
    size = config.mesh[axis]
    _require(size == -1 or size >= 1, f'config.mesh.{axis}={size} must be -1 (fill) or >= 1')
  _require(config.checkpoint.every_steps > 0 and config.checkpoint.keep > 0,
           'config.checkpoint.every_steps and config.checkpoint.keep must be positive')
  _require(config.log.every_steps > 0, 'config.log.every_steps must be positive')
  _require(config.eval.knn_k > 0, 'config.eval.knn_k must be positive')
