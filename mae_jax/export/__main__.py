r"""Converts between training runs and PyTorch files.

Export a run's checkpoint (the latest step unless --step), by the extension .pth ({'model': state_dict})
or .safetensors:

  python -m mae_jax.export --workdir=/tmp/mae_b16 --format=mae-official --out=/tmp/mae_b16.pth
  python -m mae_jax.export --workdir=/tmp/mae_b16 --format=timm-vit-avg --num_classes=1000 \
      --img_size=448 --out=/tmp/vit_b16_448.safetensors

Import a PyTorch file into params for a config's model, written as flax msgpack (for --config.init_from):

  python -m mae_jax.export import --format=mae-official --in=mae_visualize_vit_base.pth \
      --config=configs/mae_vitb.py --out=/tmp/mae_visualize_vit_base.msgpack

Formats: mae-official (facebookresearch/mae MaskedAutoencoderViT), timm-vit (cls-token pooling, `norm`),
timm-vit-avg (global average pooling, `fc_norm`), mae-finetuned, gan-mae, mage-official (LTH14/mage
MaskedGenerativeEncoderViT, its VQGAN included), vqgan (MAGE's tokenizer, `vqgan_jax_strongaug.ckpt`), and
the frozen teachers of MR-MAE (import only, no --config: clip-hf, clip-openai, clip-timm, dino;
mae_jax/export/teachers.py). Any key the conversion would lose is an error; known
partial files load with --allow_missing=GLOBS (e.g. 'decoder*,mask_token' for the encoder-only releases)
and unwanted keys are skipped with --ignore=GLOBS (e.g. 'head.*'). `--in` may be a `.pth`/`.pt`, a
pytorch-lightning `.ckpt` ({'state_dict': ...}) or a `.safetensors` file; what is wrong with a file (not a
PyTorch file, truncated, not a state dict, pickled code, integer or non-finite weights) is named.

Every mistake is one `mae_jax.export: error: ...` line (keys that do not fit follow it, one indented line each):
exit code 2 for a bad flag or input file (checked, where it can be, before anything is loaded), 1 for a fault
(an unreadable checkpoint, an unwritable --out).
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mae_jax import checkpoint, cli, paths
from mae_jax import config as config_lib
from mae_jax.export import engine, tables, teachers, torch_export, torch_import

flags.DEFINE_enum('format', 'mae-official', sorted(tables.FORMATS), 'PyTorch layout.')
flags.DEFINE_string('out', None, 'Output file: .pth or .safetensors (export), .msgpack (import).', required=True)
flags.DEFINE_string('workdir', None, 'export: the training run to read.')
flags.DEFINE_integer('step', None, 'export: checkpoint step (default: the latest).')
flags.DEFINE_integer('img_size', 0, 'export: build the PyTorch model for this resolution (0: the run\'s).')
flags.DEFINE_integer('num_classes', 0, 'export, timm formats: add a zero-initialised head of this size.')
flags.DEFINE_string('in', None, 'import: the PyTorch file (.pth, .pt, .ckpt or .safetensors).')
flags.DEFINE_list('allow_missing', [], 'import: globs of torch keys the file may lack (a known partial layout).')
flags.DEFINE_list('ignore', [], 'import: globs of torch keys in the file to leave unused.')
config_flags.DEFINE_config_file('config', None, 'import: config file of the model to build.', lock_config=True)
FLAGS = flags.FLAGS
VERB_FLAGS = {'export': ('workdir', 'step', 'img_size', 'num_classes'),
              'import': ('in', 'config', 'allow_missing', 'ignore')}


def fail(message, exit_code=2):
  cli.fail('mae_jax.export', message, exit_code)


def check_arguments(verb):
  """What can be checked before any file is read; a usage error (exit 2) each."""
  other = 'import' if verb == 'export' else 'export'
  for name in VERB_FLAGS[other]:
    if FLAGS[name].present:
      fail(f'--{name} is a flag of {other}: python -m mae_jax.export{" import" if other == "import" else ""} ...')
  extensions = torch_export.SUFFIXES if verb == 'export' else ('.msgpack',)
  if not FLAGS.out.endswith(tuple(extensions)):
    fail(f'--out={FLAGS.out} must end in {" or ".join(extensions)}')
  if paths.is_remote(FLAGS.out):
    try:
      paths.check_remote(FLAGS.out, f'--out={FLAGS.out}')
    except paths.PathError as e:
      fail(e)
  if verb == 'import':
    teacher = FLAGS.format in tables.TEACHER_FORMATS  # the model comes from the file's shapes
    if not FLAGS['in'].value or (FLAGS.config is None and not teacher):
      fail('import needs --in=FILE and --config=CONFIG (the model to build)')
    if paths.is_remote(FLAGS['in'].value):
      try:
        paths.check_remote(FLAGS['in'].value, f'--in={FLAGS["in"].value}')
      except paths.PathError as e:
        fail(e)
    if not paths.isfile(FLAGS['in'].value):
      fail(f'--in={FLAGS["in"].value} is not a file')
    if teacher:
      if FLAGS.config is not None:
        fail(f'--format={FLAGS.format} is a teacher layout: its model comes from the file, drop --config')
      return
    try:
      config_lib.validate(FLAGS.config)  # the model to build: a bad value is named before the file is read
    except config_lib.ConfigError as e:
      fail(e)
    return
  if not FLAGS.workdir:
    fail('export needs --workdir=DIR (a training run; to convert a PyTorch file: python -m mae_jax.export import)')
  for name, zero in (('img_size', "the run's"), ('num_classes', 'no head')):
    if FLAGS[name].value < 0:
      fail(f'--{name}={FLAGS[name].value} must be >= 0 (0: {zero})')
  if FLAGS.num_classes and 'head' not in tables.scope(FLAGS.format):
    fail(f'--num_classes is for the formats with a classifier head, not --format={FLAGS.format}')
  if paths.is_remote(FLAGS.workdir):
    try:
      paths.check_remote(FLAGS.workdir, f'--workdir={FLAGS.workdir}')
    except paths.PathError as e:
      fail(e)
  if not paths.isdir(FLAGS.workdir):
    fail(f'--workdir={FLAGS.workdir} does not exist')
  folder = checkpoint.directory(FLAGS.workdir)
  steps = sorted(int(name) for name in paths.listdir(folder) if name.isdigit()) if paths.isdir(folder) else []
  if not steps:
    fail(f'--workdir={FLAGS.workdir} holds no checkpoint ({folder} is missing or empty)')
  if FLAGS.step is not None and FLAGS.step not in steps:
    fail(f'--step={FLAGS.step}: no such checkpoint in {folder} (steps: {steps})')


def main(argv):
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  verb = argv[1] if len(argv) > 1 else 'export'
  check_arguments(verb)
  if verb == 'export':
    state_dict = torch_export.export_checkpoint(FLAGS.workdir, FLAGS.format, FLAGS.out, FLAGS.step,
                                                FLAGS.img_size or None, FLAGS.num_classes)
    print(f'wrote {len(state_dict)} tensors in format {FLAGS.format} to {FLAGS.out}')
  elif FLAGS.format in tables.TEACHER_FORMATS:
    params = teachers.import_file(FLAGS['in'].value, FLAGS.out, FLAGS.format, FLAGS.allow_missing, FLAGS.ignore)
  else:
    params = torch_import.import_file(FLAGS['in'].value, FLAGS.out, FLAGS.config, FLAGS.format,
                                      FLAGS.allow_missing, FLAGS.ignore)
    print(f'wrote {sorted(params)} params to {FLAGS.out}')


def run(argv):
  try:
    main(argv)
  except (torch_import.UnreadableFileError, torch_import.UnsafeFileError, engine.ConversionError) as e:
    fail(e)  # the file given is not what the command needs: a usage error, like a bad flag
  except checkpoint.CheckpointError as e:
    fail(e, 1)
  except (OSError, ValueError) as e:  # a fault: an unwritable --out, a damaged checkpoint
    reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
    fail(f'{type(e).__name__}: {reason}', 1)


if __name__ == '__main__':
  app.run(run, flags_parser=cli.flags_parser('mae_jax.export', verbs=('export', 'import')))
