"""Default configuration and its validation.

Every field exists here with a default (MAE's ViT-B recipe); `configs/*.py` only override. The config
is validated before anything is built or compiled, so a wrong value is one clear message.
"""
import math
import numbers

import ml_collections

from mae_jax.models import convvit, vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SOURCES = ('embedded', 'tfds', 'folder')
DTYPES = ('auto', 'float32', 'bfloat16')


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field."""


def base_config():
  from mae_jax import objectives, optim, tasks  # late: they import this module
  from mae_jax.objectives import mage_generation
  c = ml_collections.ConfigDict()
  c.task = 'pretrain'      # what the one loop runs (mae_jax/tasks.py): pretrain | finetune | linprobe | tokenizer
  c.objective = 'mae'
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(
      variant='B/16',          # <size>/<patch>; sizes: pico, nano (tests), Ti, S, B, L, H; or ConvMAE's hybrid
                               # ConvViT: convpico, convnano (tests), convB, <patch> the total stride (16: 4, 2, 2)
      mlp_ratio=4.0,
      drop_path_rate=0.0,      # MAE pretraining uses none
      dropout=0.0,
      dtype='auto',            # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU. Params and softmax: float32
      remat=False,             # rematerialise transformer blocks (trade compute for memory)
      remat_policy='full',     # with remat: full (save nothing) | dots (save matmul outputs) | dots_no_batch
      decoder=dict(width=512, depth=8, num_heads=16),
      # ConvViT variants only (mae_jax/models/convvit.py): a cls token (ConvMAE v2 / MR-MCMAE; v1 has none), and
      # the multi-scale fusion of the conv stages' outputs before the final norm (pretraining; never when pooled)
      convvit=dict(cls_token=False, fusion=True),
  ))

  # Each objective's and each task's own section (config.mae, config.gan_mae, config.finetune, ...), defined
  # and validated next to it.
  for name, section in {**objectives.config_sections(), **tasks.config_sections()}.items():
    c[name] = section

  c.data = ml_collections.ConfigDict(dict(
      source='embedded',       # embedded | tfds | folder
      name='digits',           # embedded dataset name, TFDS name, or image-folder root
      data_dir='',             # TFDS data dir ('' = TFDS's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
      image_key='image',       # TFDS feature names of the image and the label ('' label_key: unlabelled)
      label_key='label',
      train_split='train',
      eval_split='test',       # labelled split for kNN ('' disables kNN)
      img_size=224,
      crop_scale=(0.2, 1.0),   # RandomResizedCrop(scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic) + flip
      crop_ratio=(3 / 4, 4 / 3),
      hflip=True,
      interpolation='bicubic', # RandomResizedCrop resampling: bicubic (MAE, GAN-MAE, MR-MAE) | bilinear (MAGE)
      mean=IMAGENET_MEAN,      # MAGE feeds [0, 1] pixels to its VQGAN: mean=(0, 0, 0), std=(1, 1, 1)
      std=IMAGENET_STD,
      prefetch=2,              # batches decoded ahead of the one being trained on
      num_workers=0,           # image-decoding threads per process; 0 = the CPU cores (at most 32)
      max_pixels=64_000_000,   # larger images: JPEGs decoded at 1/2..1/8 size, others skipped (and counted)
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
      on_nonfinite='stop',     # a non-finite loss or gradient: 'stop' (as the reference) or 'skip' the update
      max_consecutive_nonfinite=5,  # with 'skip', stop anyway after this many in a row
      grad_clip=0.0,           # clip the global gradient norm to this value; 0 = off (MAE's recipe has none)
  ))

  # Optimizer and parameter groups (regex rules over parameter paths): mae_jax/optim.py.
  c.optim = optim.default_config()

  # Device mesh: -1 fills the remaining devices. Arrays of at least fsdp_min_size_mb are sharded over 'fsdp'.
  # dcn_<axis>: how many slices (TPU multi-slice) or processes (GPU nodes) that axis spans; it divides <axis>.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, fsdp_min_size_mb=4.0, dcn_data=1, dcn_fsdp=1))

  # Keep the newest `keep` checkpoints, plus every `keep_every_steps`-th step (0: none) for the record.
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3, keep_every_steps=0))
  # Resuming with other values of these fields (comma-separated, a section names all its fields) that change the
  # run's meaning (model, data, batch, schedule, ...): allowed only when named here. Logging, evaluation and
  # length changes need no naming (checkpoint.HARMLESS_FIELDS).
  c.allow_config_change = ''
  c.init_from = ''  # warm start: a workdir or an imported params file; loads the params that match by name and shape

  c.log = ml_collections.ConfigDict(dict(
      every_steps=50,
      images_every_steps=1000,  # TensorBoard grid of original | masked | reconstruction
      num_images=8,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      evaluators=('knn',),     # which of the task's evaluators run (on data.eval_split; '' there disables all)
      every_steps=0,           # classification: also every this many steps (0: before training and at the end)
      batch_size=256,          # classification evaluation batch
      knn_every_steps=0,       # 0: only before training and at the end
      knn_k=20,
      knn_temperature=0.07,
      knn_batch_size=256,
      knn_bank_size=0,         # training images in the kNN bank, evenly spaced; 0 = the whole split
      # 'fid' (MAGE): FID/IS of num_images samples (decoded with num_iter, choice_temperature, temperature)
      # against reference statistics, with the FID Inception's weights file; needs no eval split
      fid=mage_generation.FidEvaluator.default_config(),
  ))
  return c


def tiny_cpu_config():
  """The CPU demo's model and schedule, shared by the configs/*_tiny_cpu.py files: a 4-layer, 64-wide ViT
  with 4x4 patches on the embedded 32x32 digits (64 patches, 16 visible), a 2-layer decoder, 20 epochs."""
  c = base_config()
  c.model.variant = 'nano/4'
  c.model.decoder.update(width=64, depth=2, num_heads=4)
  c.mae.norm_pix_loss = False  # pixel targets reconstruct visibly; the grid in TensorBoard shows digits
  c.data.img_size = 32
  c.data.crop_scale = (0.5, 1.0)  # digits are centred, tight scans: a 0.2 crop often cuts the digit away
  c.train.update(batch_size=64, epochs=20, warmup_epochs=2, blr=1.5e-4 * 10)
  c.checkpoint.every_steps = 100
  c.log.update(every_steps=20, images_every_steps=200)
  return c


def require(ok, message):
  """Raises ConfigError(message) unless `ok`: the one way every validation check reports."""
  if not ok:
    raise ConfigError(message)


def is_number(value, finite=True):
  """A real number (not a bool), finite unless `finite=False`: what a numeric field must hold."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and (not finite or math.isfinite(value)))


def are_numbers(value, count):
  """`value` is a tuple or list of `count` finite real numbers (a crop range, a per-channel mean)."""
  return isinstance(value, (tuple, list)) and len(value) == count and all(map(is_number, value))


def validate(config):
  """Checks every value that would otherwise fail late or silently; raises ConfigError."""
  from mae_jax import objectives, optim, tasks  # late: they import this module
  require(config.task in tasks.TASKS, f'config.task={config.task!r} is not one of {sorted(tasks.TASKS)}')
  require(config.objective in objectives.OBJECTIVES,
          f'config.objective={config.objective!r} is not one of {sorted(objectives.OBJECTIVES)}')
  try:
    patch = convvit.encoder_dims(config.model.variant)['patch_size']
  except ValueError as e:
    raise ConfigError(f'config.model.variant: {e}') from None
  require(config.data.img_size > 0 and config.data.img_size % patch == 0,
          f'config.data.img_size={config.data.img_size} must be a positive multiple of the patch size {patch}')
  require(config.model.dtype in DTYPES, f'config.model.dtype={config.model.dtype!r} is not one of {DTYPES}')
  require(0.0 <= config.model.drop_path_rate < 1.0, 'config.model.drop_path_rate must be in [0, 1)')
  require(0.0 <= config.model.dropout < 1.0, f'config.model.dropout={config.model.dropout} must be in [0, 1)')
  require(is_number(config.model.mlp_ratio) and config.model.mlp_ratio > 0,
          f'config.model.mlp_ratio={config.model.mlp_ratio} must be a positive number')
  dec = config.model.decoder
  require(dec.depth >= 0 and dec.num_heads >= 1 and dec.width >= 4 and dec.width % 4 == 0
          and dec.width % dec.num_heads == 0,
          f'config.model.decoder={dec.to_dict()}: depth >= 0, num_heads >= 1, and a width divisible by 4 (its '
          'sin-cos table) and by num_heads')
  require(config.data.source in DATA_SOURCES,
          f'config.data.source={config.data.source!r} is not one of {DATA_SOURCES}')
  require(are_numbers(config.data.crop_scale, 2) and are_numbers(config.data.crop_ratio, 2),
          'config.data.crop_scale and config.data.crop_ratio need two values (lo, hi)')
  lo, hi = config.data.crop_scale
  require(0.0 < lo <= hi <= 1.0, f'config.data.crop_scale={tuple(config.data.crop_scale)} must satisfy 0 < lo <= hi <= 1')
  require(are_numbers(config.data.mean, 3) and are_numbers(config.data.std, 3) and min(config.data.std) > 0,
          'config.data.mean and config.data.std need three values, std > 0')
  require(config.data.interpolation in ('bicubic', 'bilinear'),
          f"config.data.interpolation={config.data.interpolation!r} is not 'bicubic' or 'bilinear'")
  lo, hi = config.data.crop_ratio
  require(0.0 < lo <= hi, f'config.data.crop_ratio={tuple(config.data.crop_ratio)} must satisfy 0 < lo <= hi')
  require(config.data.num_workers >= 0 and config.data.prefetch >= 0 and config.data.max_pixels > 0,
          'config.data: num_workers >= 0 (0 = auto), prefetch >= 0, max_pixels > 0')
  require(bool(config.data.name), 'config.data.name is empty: name the embedded dataset, TFDS dataset or image folder')
  require(bool(config.data.train_split), 'config.data.train_split is empty: name the split to train on')
  require(bool(config.data.image_key), "config.data.image_key is empty: name the images' feature (TFDS)")
  t = config.train
  require(t.batch_size > 0, f'config.train.batch_size={t.batch_size} must be positive')
  require(t.grad_accum_steps >= 1, f'config.train.grad_accum_steps={t.grad_accum_steps} must be >= 1')
  require(t.num_steps > 0 or t.epochs > 0, 'set config.train.epochs > 0 or config.train.num_steps > 0')
  require(0 <= t.warmup_epochs and (t.num_steps > 0 or t.warmup_epochs < t.epochs),
          f'config.train.warmup_epochs={t.warmup_epochs} must be in [0, epochs={t.epochs})')
  require(all(map(is_number, (t.blr, t.min_lr, t.weight_decay))) and t.blr > 0 and t.min_lr >= 0
          and t.weight_decay >= 0, 'config.train: blr > 0, min_lr >= 0, weight_decay >= 0, all finite')
  peak = optim.peak_learning_rate(t)
  require(t.min_lr <= peak, f'config.train.min_lr={t.min_lr} is above the peak lr {peak:.4g} (blr * batch_size / '
          '256): the cosine schedule would rise')
  require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, 'config.train.b1 and b2 must be in [0, 1)')
  for axis in ('data', 'fsdp'):
    size = config.mesh[axis]
    require(size == -1 or size >= 1, f'config.mesh.{axis}={size} must be -1 (fill) or >= 1')
    require(config.mesh[f'dcn_{axis}'] >= 1, f'config.mesh.dcn_{axis} must be >= 1')
  require(config.mesh.fsdp_min_size_mb >= 0,
          f'config.mesh.fsdp_min_size_mb={config.mesh.fsdp_min_size_mb} must be >= 0 (inf: never shard)')
  require(t.grad_clip >= 0, f'config.train.grad_clip={t.grad_clip} must be >= 0 (0 = off)')
  require(config.model.remat_policy in vit.REMAT_POLICIES,
          f'config.model.remat_policy={config.model.remat_policy!r} is not one of {sorted(vit.REMAT_POLICIES)}')
  require(config.checkpoint.every_steps > 0 and config.checkpoint.keep > 0,
          'config.checkpoint.every_steps and config.checkpoint.keep must be positive')
  require(config.checkpoint.keep_every_steps >= 0, 'config.checkpoint.keep_every_steps must be >= 0')
  require(t.on_nonfinite in ('stop', 'skip'), f"config.train.on_nonfinite={t.on_nonfinite!r} is not 'stop' or 'skip'")
  require(t.max_consecutive_nonfinite >= 1, 'config.train.max_consecutive_nonfinite must be >= 1')
  require(config.log.every_steps > 0, 'config.log.every_steps must be positive')
  require(config.log.images_every_steps > 0, 'config.log.images_every_steps must be positive')
  require(config.log.num_images >= 1, f'config.log.num_images={config.log.num_images} must be >= 1')
  require(config.seed >= 0, f'config.seed={config.seed} must be >= 0')
  e = config.eval
  require(min(e.every_steps, e.knn_every_steps, e.knn_bank_size) >= 0,
          'config.eval: every_steps, knn_every_steps and knn_bank_size must be >= 0 (0 = off / the whole split)')
  require(min(e.batch_size, e.knn_batch_size) > 0 and is_number(e.knn_temperature) and e.knn_temperature > 0,
          'config.eval: batch_size, knn_batch_size and knn_temperature must be positive (and finite)')
  require(not e.knn_bank_size or e.knn_k <= e.knn_bank_size,
          f'config.eval.knn_k={e.knn_k} is more neighbours than the bank of knn_bank_size={e.knn_bank_size} images')
  for name in filter(None, config.allow_config_change.split(',')):
    node = config
    for key in name.split('.'):
      require(isinstance(node, ml_collections.ConfigDict) and key in node,
              f'config.allow_config_change: {name!r} is not a field or section of the config')
      node = node[key]
  require(config.eval.knn_k > 0, 'config.eval.knn_k must be positive')
  objectives.OBJECTIVES[config.objective].validate(config)
  optim.validate(config)
  tasks.TASKS[config.task].validate(config)
