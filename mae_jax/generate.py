r"""Samples and edits images with a MAGE: the reference's iterative decoding (mae_jax/objectives/mage_generation.py).

From a training run (its latest checkpoint unless --step), or an imported release (--init_from, with its config):

  python -m mae_jax.generate --workdir=workdirs/mage_tiny --out=samples --num_images=64 --grid=samples_grid.png
  python -m mae_jax.generate --init_from=mage-vitb-1600.msgpack --config=configs/mage_vitb.py \
      --config.mage.tokenizer=vqgan_jax_strongaug.msgpack --out=gen/mage-vitb --num_images=50000 \
      [--num_iter=20 --choice_temperature=6.0 --temperature=1.0 --batch=32 --seed=0]

Editing one image (resized and centre-cropped to the model's size; the box in its pixels, x1 and y1 exclusive):

  python -m mae_jax.generate --workdir=DIR --out=edits --inpaint=photo.png --box=64,64,192,192
  python -m mae_jax.generate --workdir=DIR --out=edits --outpaint=photo.png --box=64,64,192,192
  python -m mae_jax.generate --workdir=DIR --out=edits --reconstruct=photo.png --mask_ratio=0.5

Generation writes `{i:05d}.png` (the reference's `clip(x * 255)` truncated to uint8), image i drawn from
fold_in(key(seed), i): the same images on any mesh and at any --batch. Editing writes --num_images variants,
`{i:05d}.png` and `panel_{i:05d}.png` (input | mask, grey | output). Every mistake is one
`mae_jax.generate: error: ...` line: exit code 2 for a bad flag or input, 1 for a fault (a damaged checkpoint).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from mae_jax import checkpoint, cli, frozen, objectives, paths, sharding
from mae_jax import config as config_lib
from mae_jax.data import decode
from mae_jax.evaluate import fid
from mae_jax.objectives import mage_generation as generation
from mae_jax.objectives.mage import MAGE

PROGRAM = 'mae_jax.generate'
flags.DEFINE_string('out', None, 'Output folder of the PNGs.', required=True)
flags.DEFINE_string('workdir', None, 'A MAGE training run.')
flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default: the latest).')
flags.DEFINE_string('init_from', None, 'With --config: params of python -m mae_jax.export import '
                    '(--format=mage-official).')
config_flags.DEFINE_config_file('config', None, 'With --init_from: the config of its model (configs/mage_*.py).',
                                lock_config=True)
flags.DEFINE_integer('num_images', 16, 'Images to generate (the paper: 50000), or variants of the edited image.')
flags.DEFINE_integer('num_iter', generation.DEFAULTS['num_iter'], 'Decoding steps (the reference script: 12).')
flags.DEFINE_float('choice_temperature', generation.DEFAULTS['choice_temperature'],
                   'Gumbel noise on the confidences, annealed to 0 (the reference script: 4.5).')
flags.DEFINE_float('temperature', generation.DEFAULTS['temperature'], 'Sampling temperature of the logits.')
flags.DEFINE_integer('batch', 32, 'Images per compiled call (rounded to the devices).')
flags.DEFINE_integer('seed', 0, 'Image i is drawn from fold_in(key(seed), i).')
flags.DEFINE_string('grid', '', 'Also write the first 64 images as one grid PNG here.')
flags.DEFINE_string('inpaint', None, 'An image: regenerate --box (its tokens and a one-token border).')
flags.DEFINE_string('outpaint', None, 'An image: keep --box (less a one-token border), regenerate the rest.')
flags.DEFINE_string('reconstruct', None, 'An image: regenerate --mask_ratio of its tokens, chosen at random.')
flags.DEFINE_list('box', None, 'x0,y0,x1,y1: the pixel box of --inpaint / --outpaint (x1, y1 exclusive).')
flags.DEFINE_float('mask_ratio', 0.5, 'With --reconstruct: the share of tokens regenerated, in (0, 1].')
FLAGS = flags.FLAGS
EDITS = ('inpaint', 'outpaint', 'reconstruct')
GRID_SIZE = 64


def fail(message, exit_code=2):
  cli.fail(PROGRAM, cli.one_line(message), exit_code)


def check_arguments():
  """What can be checked before anything is read; a usage error (exit 2) each. Returns the edit mode or None."""
  if bool(FLAGS.workdir) == bool(FLAGS.init_from):
    fail('name the model: --workdir=DIR (a MAGE run) or --init_from=FILE --config=CONFIG (an imported release)')
  if FLAGS.init_from and FLAGS.config is None:
    fail('--init_from needs --config=CONFIG (the config of its model, e.g. configs/mage_vitb.py)')
  if FLAGS.workdir and FLAGS.config is not None:
    fail("--config is for --init_from; a --workdir's run has its own config")
  if FLAGS.init_from and FLAGS.step is not None:
    fail('--step is for --workdir')
  for name, ok in (('num_images', FLAGS.num_images >= 1), ('num_iter', FLAGS.num_iter >= 1),
                   ('batch', FLAGS.batch >= 1), ('temperature', FLAGS.temperature > 0),
                   ('choice_temperature', FLAGS.choice_temperature >= 0), ('seed', FLAGS.seed >= 0),
                   ('mask_ratio', 0 < FLAGS.mask_ratio <= 1)):
    if not ok:
      fail(f'--{name}={FLAGS[name].value} is out of range (num_images, num_iter, batch >= 1; temperature > 0; '
           'choice_temperature, seed >= 0; 0 < mask_ratio <= 1)')
  for name in ('workdir', 'init_from', 'out', 'grid', *EDITS):  # a bucket out of reach: one line, before JAX starts
    if FLAGS[name].value and paths.is_remote(FLAGS[name].value):
      try:
        paths.check_remote(FLAGS[name].value, f'--{name}={FLAGS[name].value}')
      except paths.PathError as e:
        fail(e)
  if FLAGS.out and paths.isfile(FLAGS.out):
    fail(f'--out={FLAGS.out} is a file; name a folder for the images')
  if FLAGS.grid and not FLAGS.grid.lower().endswith('.png'):
    fail(f'--grid={FLAGS.grid}: the grid is a PNG; name a .png file')
  if FLAGS.workdir:
    if not paths.isdir(FLAGS.workdir):
      fail(f'--workdir={FLAGS.workdir} does not exist')
    if not checkpoint.has_checkpoint(FLAGS.workdir):
      fail(f'--workdir={FLAGS.workdir} holds no checkpoint ({checkpoint.directory(FLAGS.workdir)} is missing or empty)')
    if FLAGS.step is not None and not paths.isdir(paths.join(checkpoint.directory(FLAGS.workdir), str(FLAGS.step))):
      fail(f'--step={FLAGS.step}: no such checkpoint in {checkpoint.directory(FLAGS.workdir)}')
  elif not paths.isfile(FLAGS.init_from):
    fail(f'--init_from={FLAGS.init_from} is not a file (python -m mae_jax.export import --format=mage-official ...)')
  edits = [name for name in EDITS if FLAGS[name].value]
  if len(edits) > 1:
    fail(f'--{" and --".join(edits)}: one edit at a time')
  edit = edits[0] if edits else None
  if edit and not paths.isfile(FLAGS[edit].value):
    fail(f'--{edit}={FLAGS[edit].value} is not a file')
  if (edit in ('inpaint', 'outpaint')) != bool(FLAGS.box):
    fail('--box=x0,y0,x1,y1 goes with --inpaint or --outpaint' if FLAGS.box else f'--{edit} needs --box=x0,y0,x1,y1')
  if FLAGS.box and (len(FLAGS.box) != 4 or not all(v.strip().lstrip('-').isdigit() for v in FLAGS.box)):
    fail(f'--box={",".join(FLAGS.box)} is not four integers x0,y0,x1,y1')
  return edit


def load(mesh):
  """(model, params with the tokenizer, on the mesh) of --workdir or --init_from; ConfigError if they are no MAGE."""
  if FLAGS.workdir:
    config, params = checkpoint.load_params(FLAGS.workdir, FLAGS.step)
    where = f'--workdir={FLAGS.workdir}'
  else:
    config = FLAGS.config
    config.init_from = FLAGS.init_from
    config_lib.validate(config)
    where = '--config'
  if not issubclass(objectives.OBJECTIVES.get(config.objective, object), MAGE):
    raise config_lib.ConfigError(f'{where}: config.objective={config.objective!r} is not MAGE (only MAGE generates '
                                 'images)')
  model = objectives.create(config)
  if FLAGS.init_from:  # its shapes checked against the config's model, each mismatch named
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    params = frozen.read(frozen.FrozenNetwork('init_from', lambda: abstract), config)
  tokenizer, _ = frozen.load(model.frozen_networks(), config, mesh)
  return model, {**jax.device_put(params, sharding.replicated(mesh)), **tokenizer}


def write_png(path, image):
  if paths.is_remote(path):
    with paths.open_file(path, 'wb') as f:  # one upload per image
      Image.fromarray(np.asarray(image)).save(f, format='PNG')
  else:
    Image.fromarray(np.asarray(image)).save(path, format='PNG')


def tile(images, columns=8, pad=2):
  """(N, H, W, 3) uint8 -> one grid image, `columns` wide, white between the cells."""
  n, h, w, _ = images.shape
  rows = -(-n // columns)
  cells = np.full((rows * columns, h + 2 * pad, w + 2 * pad, 3), 255, np.uint8)
  cells[:n, pad:pad + h, pad:pad + w] = images
  return cells.reshape(rows, columns, h + 2 * pad, w + 2 * pad, 3).transpose(0, 2, 1, 3, 4).reshape(
      rows * (h + 2 * pad), columns * (w + 2 * pad), 3)


def batches(mesh):
  """(start, indices (B,)) of every batch of --num_images, B a multiple of the devices; the last one padded."""
  devices = mesh.devices.size
  size = max(devices, -(-min(FLAGS.batch, FLAGS.num_images) // devices) * devices)
  for start in range(0, FLAGS.num_images, size):
    yield start, np.arange(start, start + size, dtype=np.int32)


def log(message):
  print(message, file=sys.stderr, flush=True)


def options():
  return dict(num_iter=FLAGS.num_iter, choice_temperature=FLAGS.choice_temperature, temperature=FLAGS.temperature)


def run_generation(model, params, mesh):
  run = generation.jit_generate(model, mesh, **options())
  shown = []
  for start, indices in batches(mesh):
    images, _ = run(params, FLAGS.seed, indices)
    images = np.asarray(images)[:FLAGS.num_images - start]
    if jax.process_index() == 0:
      for i, image in enumerate(images):
        write_png(paths.join(FLAGS.out, f'{start + i:05d}.png'), image)
    shown.extend(images[:GRID_SIZE - len(shown)])
    log(f'{start + len(images)}/{FLAGS.num_images} images written to {FLAGS.out}')
  if FLAGS.grid and jax.process_index() == 0:
    write_png(FLAGS.grid, tile(np.stack(shown)))
    log(f'wrote the grid of the first {len(shown)} to {FLAGS.grid}')


def read_image(path, size):
  """A [0, 1] (1, size, size, 3) image: resized (shorter side) and centre-cropped as the FID reference is."""
  try:
    image = fid.resize_center_crop(decode.open_rgb(paths.read_bytes(path) if paths.is_remote(path) else path), size)
  except decode.BadImage as e:
    raise config_lib.ConfigError(f'{path}: {e}') from None
  return jnp.asarray(np.asarray(image, np.float32)[None] / 255)


def run_edit(model, params, mesh, edit):
  size = model.img_size
  if edit == 'reconstruct':
    box = None
  else:
    box = tuple(int(v) for v in FLAGS.box)
    try:
      generation.check_box(box, size)
    except ValueError as e:
      raise config_lib.ConfigError(f'--box: {e}') from None
  pixels = read_image(FLAGS[edit].value, size)
  run = generation.jit_edit(model, mesh, box, edit == 'outpaint', FLAGS.mask_ratio, **options())
  for start, indices in batches(mesh):
    panels = {name: np.asarray(v)[:FLAGS.num_images - start] for name, v in run(params, FLAGS.seed, indices,
                                                                                 pixels).items()}
    if jax.process_index() == 0:
      for i, output in enumerate(panels['output']):
        write_png(paths.join(FLAGS.out, f'{start + i:05d}.png'), output)
        row = tile(np.stack([panels[name][i] for name in ('input', 'mask', 'output')]), columns=3)
        write_png(paths.join(FLAGS.out, f'panel_{start + i:05d}.png'), row)
  log(f'{FLAGS.num_images} {edit} panel(s) (input | mask | output) written to {FLAGS.out}')


def main(argv):
  del argv  # the flags parser refuses positional arguments
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  edit = check_arguments()
  try:
    mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
    model, params = load(mesh)
    paths.makedirs(FLAGS.out)
    if FLAGS.grid and paths.dirname(FLAGS.grid):
      paths.makedirs(paths.dirname(FLAGS.grid))
    if edit:
      run_edit(model, params, mesh, edit)
    else:
      run_generation(model, params, mesh)
  except (config_lib.ConfigError, FileNotFoundError) as e:
    fail(e)
  except checkpoint.CheckpointError as e:
    fail(e, 1)
  except OSError as e:  # an unwritable --out
    fail(f'{type(e).__name__}: {e}', 1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(PROGRAM))
