r"""FID and Inception Score as torch-fidelity computes them (MAGE's numbers), with the Inception in JAX.

  python -m mae_jax.evaluate.fid --generated=DIR --reference=DIR_OR_STATS.npz \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth [--batch_size=64 --trace=sqrtm --isc_splits=10]
  python -m mae_jax.evaluate.fid stats --images=DIR --out=STATS.npz --inception_weights=FILE
  python -m mae_jax.evaluate.fid prepare-reference --imagenet_val=/data/imagenet/val --out=DIR
  python -m mae_jax.evaluate.fid random-weights --out=FILE   # a random network, for smoke runs only

MAGE's README scores 50,000 generated PNGs against ImageNet-val at 256 px with torch-fidelity (`fidelity --isc
--fid`, version 0.3.0 in Nov 2022; spec mage.md 2.4, downstream_fid_teachers.md 1.4). This module reproduces
that computation step by step:
  images     every .png/.jpg/.jpeg of the folder (not its subfolders), in sorted path order, decoded to uint8 RGB;
  resize     to 299 x 299 by TF1's bilinear rule (`src = dst * in / out`, no half-pixel offset, the upper
             neighbour clamped; torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`), then (x - 128) / 128;
  features   the FID Inception's 2048-d pool (FID) and unbiased logits (IS), jitted and sharded over the batch;
  FID        |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2) with S = np.cov; the trace of the square root by
             `scipy.linalg.sqrtm` ('sqrtm', torch-fidelity 0.3.0, the default: what MAGE used; eps 1e-6 on the
             diagonals when the product is singular) or by the eigenvalues of S1 S2 ('eigvals', 0.4.0);
  IS         the logits permuted by np.random.RandomState(2020), softmax in float64, 10 splits at i * N // 10,
             the mean (and std) over splits of exp(mean KL(p(y|x) || p(y))).
The reference statistics are cached in an .npz (mu, sigma, count and the SHA-256 of the Inception weights that
made them, so statistics of another network are refused). `prepare-reference` writes ImageNet-val the reference's
way (prepare_imgnet_val.py: PIL bilinear Resize(256) of the shorter side, CenterCrop(256), PNG `{i:05d}.png`):
JPEG references shift MAGE's FID from 11.18 to 13.74 (LTH14/mage#8). Nothing is ever downloaded: the weights
file is given; without it (or with a wrong one) the command says where to get it (exit 2).

Known differences from torch-fidelity, all below its own float32 noise: mu is averaged in float64 (torch-fidelity:
float32); convolutions run at full float32 precision (torch on GPUs allows TF32 in convolutions); a 16-bit
greyscale image is scaled to 8 bits (`mae_jax.data.decode`) where PIL's convert('RGB') would clip it to white.
"""
import argparse
import concurrent.futures
import functools
import io
import os
import sys
import warnings
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg
import scipy.special
from PIL import Image

from mae_jax import cli, paths, sharding
from mae_jax.config import ConfigError
from mae_jax.data import decode, loader, sources
from mae_jax.evaluate.base import Evaluator
from mae_jax.models import inception

PROGRAM = 'mae_jax.evaluate.fid'
INPUT_SIZE = 299
IMAGE_EXTENSIONS = ('png', 'jpg', 'jpeg')  # torch-fidelity's samples_find_ext
TRACES = ('sqrtm', 'eigvals')
ISC_SEED = 2020
SQRTM_EPS = 1e-6
REFERENCE_SIZE = 256


class FidError(ValueError):
  """An input that cannot give a FID or IS (no images, mixed sizes, too few images, foreign statistics)."""


# ----------------------------------------------------------------------------------------------- preprocessing

def _tf1_grid(in_size, out_size):
  """(lower index, upper index, weight of the upper) of each output pixel: float32 `dst * (in / out)`, as TF1."""
  src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
  lower = src.astype(np.int32)
  return lower, np.minimum(lower + 1, in_size - 1), src - lower.astype(np.float32)


def resize_bilinear_tf1(images, size):
  """(N, H, W, C) float -> (N, size[0], size[1], C): TF1's `resize_bilinear(align_corners=False)`, lerp in x,
  then in y, in the operation order of torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`."""
  y_lo, y_hi, dy = _tf1_grid(images.shape[1], size[0])
  x_lo, x_hi, dx = _tf1_grid(images.shape[2], size[1])

  def lerp_x(rows):
    left, right = rows[:, :, x_lo], rows[:, :, x_hi]
    return left + (right - left) * dx[:, None]

  top, bottom = lerp_x(images[:, y_lo]), lerp_x(images[:, y_hi])
  return top + (bottom - top) * dy[:, None, None]


def preprocess(images):
  """uint8 (N, H, W, 3) -> the Inception's float32 input: TF1 bilinear to 299, then (x - 128) / 128."""
  x = resize_bilinear_tf1(images.astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
  return (x - 128) / 128


def to_uint8(images):
  """[0, 1] images -> uint8 the reference's way (gen_img_uncond.py: `np.clip(x * 255, 0, 255).astype(uint8)`,
  truncating): what its PNGs hold."""
  return jnp.clip(images * 255, 0, 255).astype(jnp.uint8)


def _features(variables, images):
  out = inception.InceptionV3().apply(variables, preprocess(images))
  return out['pool'], out['logits_unbiased']


@functools.lru_cache(maxsize=None)
def _features_fn(mesh):
  return jax.jit(_features, out_shardings=sharding.replicated(mesh))


class InceptionFeatures:
  """uint8 images -> (2048-d pool features, unbiased logits) as float32 host arrays, on every host: jitted,
  with the batch sharded over the mesh (each process decodes only its slice of each batch of files)."""

  def __init__(self, variables, mesh, batch_size=64):
    devices = mesh.devices.size
    self.mesh, self.batch_size = mesh, max(devices, batch_size // devices * devices)
    self.variables = jax.device_put(variables, sharding.replicated(mesh))
    self.apply = _features_fn(mesh)

  def __call__(self, images):
    """Features of a batch: a jax.Array (already on the mesh, e.g. generated) or a process-local NumPy slice."""
    if isinstance(images, np.ndarray):
      images = sharding.global_batch(images, self.mesh)
    pool, logits = self.apply(self.variables, images)
    return np.asarray(pool), np.asarray(logits)

  def of_files(self, paths, num_workers=None, log=None):
    """Features of image files, in order; every image must have the first one's size (one compiled shape)."""
    if not paths:
      raise FidError('no images to compute features of')
    first = _read(paths[0])
    n_proc, proc = jax.process_count(), jax.process_index()
    local = self.batch_size // n_proc
    starts = range(0, len(paths), self.batch_size)

    def local_batch(pool, start):
      mine = paths[start + proc * local:start + (proc + 1) * local]
      return start, pool.map(functools.partial(_read, like=first, first_path=paths[0]), mine)

    pools, logits = [], []
    with concurrent.futures.ThreadPoolExecutor(num_workers or loader.default_num_workers()) as pool:
      pending = [local_batch(pool, s) for s in starts[:2]]  # one batch decoded ahead
      for i in range(len(starts)):
        start, images = pending.pop(0)
        if i + 2 < len(starts):
          pending.append(local_batch(pool, starts[i + 2]))
        batch = np.zeros((local,) + first.shape, np.uint8)
        for j, image in enumerate(images):
          batch[j] = image
        p, l = self(batch)
        n = min(self.batch_size, len(paths) - start)
        pools.append(p[:n])
        logits.append(l[:n])
        if log and ((start + n) // 1000 > start // 1000 or start + n == len(paths)):
          log(f'{start + n}/{len(paths)} images')
    return np.concatenate(pools), np.concatenate(logits)


def _read(path, like=None, first_path=None):
  try:
    image = np.asarray(decode.open_rgb(paths.read_bytes(path) if paths.is_remote(path) else path))
  except decode.BadImage as e:
    raise FidError(f'{path}: {e}') from None
  if like is not None and image.shape != like.shape:
    raise FidError(f'{path} is {image.shape[1]}x{image.shape[0]} but {first_path} is {like.shape[1]}x{like.shape[0]}: '
                   'the images of a folder must share one size (torch-fidelity batches them too)')
  return image


def image_files(folder):
  """torch-fidelity's sample list: the folder's own .png/.jpg/.jpeg files (any case), sorted real paths."""
  if not paths.isdir(folder):
    raise FidError(f'{folder} is not a folder of images')
  if paths.is_remote(folder):  # the folder's own objects, not those of its sub-prefixes
    files = sorted(path for path, _ in paths.walk_files(folder) if paths.dirname(path) == folder.rstrip('/')
                   and path.rsplit('.', 1)[-1].lower() in IMAGE_EXTENSIONS)
  else:
    files = sorted(os.path.realpath(e.path) for e in os.scandir(folder)
                   if e.is_file() and os.path.splitext(e.name)[1][1:].lower() in IMAGE_EXTENSIONS)
  if not files:
    raise FidError(f'no .png, .jpg or .jpeg files in {folder}')
  return files


# ------------------------------------------------------------------------------------------------------ metrics

def statistics(features, weights_sha256=''):
  """{'mu', 'sigma', 'count', 'inception_sha256'} of (N, D) features: the mean and np.cov (float64)."""
  features = np.asarray(features)
  if len(features) < 2:
    raise FidError(f'{len(features)} image(s): a covariance needs at least 2')
  return {'mu': features.mean(axis=0, dtype=np.float64), 'sigma': np.cov(features, rowvar=False),
          'count': len(features), 'inception_sha256': weights_sha256}


def save_statistics(stats, path):
  with paths.open_file(path, 'wb') as f:  # np.savez would append .npz to another name
    np.savez(f, mu=stats['mu'], sigma=stats['sigma'], count=np.int64(stats['count']),
             inception_sha256=np.str_(stats['inception_sha256']))


def load_statistics(path, weights_sha256=None):
  """Statistics written by `save_statistics`; FidError if they are not, or were made by other Inception weights."""
  try:
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as data:
      stats = {'mu': data['mu'], 'sigma': data['sigma'], 'count': int(data['count']),
               'inception_sha256': str(data['inception_sha256'])}
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    raise FidError(f'{path} is not a statistics file of `python -m {PROGRAM} stats` '
                   f'({type(e).__name__}: {e})') from None
  if weights_sha256 is not None and stats['inception_sha256'] != weights_sha256:
    raise FidError(f'{path} was computed with Inception weights of sha256 {stats["inception_sha256"][:16]}..., not '
                   f'these ({weights_sha256[:16]}...): its FID would mean nothing; compute it again with these')
  return stats


def _trace_sqrtm(sigma1, sigma2):
  """tr sqrt(S1 S2) by scipy's sqrtm, as torch-fidelity 0.3.0 (and TTUR's fid.py) compute it."""
  with warnings.catch_warnings():  # 'singular' (fewer images than features): handled below, as 0.3.0's disp=False
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # regularise both, as the reference does
      offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
      covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise FidError(f'the square root of S1 S2 has an imaginary component of {np.max(np.abs(covmean.imag)):.3g} '
                     "(too few images for the feature width? --trace=eigvals does not fail here)")
    covmean = covmean.real
  return np.trace(covmean)


def _trace_eigvals(sigma1, sigma2):
  """tr sqrt(S1 S2) as the sum of the square roots of its eigenvalues' (torch-fidelity 0.4.0)."""
  return np.sum(np.sqrt(np.linalg.eigvals(sigma1.dot(sigma2)).astype(np.complex128)).real)


def frechet_distance(mu1, sigma1, mu2, sigma2, trace='sqrtm'):
  """The Fréchet distance of two Gaussians; `trace` chooses how tr sqrt(S1 S2) is computed (TRACES)."""
  if trace not in TRACES:
    raise FidError(f'trace={trace!r} is not one of {TRACES}')
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise FidError(f'statistics of different widths: {mu1.shape[0]} and {mu2.shape[0]} features')
  diff = mu1 - mu2
  tr_covmean = (_trace_sqrtm if trace == 'sqrtm' else _trace_eigvals)(sigma1, sigma2)
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_statistics(stats1, stats2, trace='sqrtm'):
  return frechet_distance(stats1['mu'], stats1['sigma'], stats2['mu'], stats2['sigma'], trace)


def inception_score(logits, splits=10, shuffle=True, seed=ISC_SEED):
  """(mean, std) over `splits` of exp(E_x KL(p(y|x) || p(y))), torch-fidelity's `isc_features_to_metric`."""
  n = len(logits)
  if n < splits:
    raise FidError(f'{n} image(s) cannot be split {splits} ways for the Inception Score')
  if shuffle:
    logits = logits[np.random.RandomState(seed).permutation(n)]
  logits = np.asarray(logits, np.float64)
  p, log_p = scipy.special.softmax(logits, axis=1), scipy.special.log_softmax(logits, axis=1)
  scores = []
  for i in range(splits):
    chunk = slice(i * n // splits, (i + 1) * n // splits)
    q = p[chunk].mean(axis=0, keepdims=True)
    scores.append(np.exp(np.sum(p[chunk] * (log_p[chunk] - np.log(q)), axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def reference_files(reference):
  """The image files of a reference folder, or None for a statistics file; FidError if it is neither."""
  if paths.isdir(reference):
    return image_files(reference)
  if not paths.isfile(reference):
    raise FidError(f'the reference {reference} is neither a folder of images nor a statistics .npz')
  return None


def reference_statistics(reference, extractor, weights_sha256, log=None):
  """Statistics of `reference`: a statistics .npz (checked to come from the same weights) or a folder of images."""
  files = reference_files(reference)
  if files is None:
    return load_statistics(reference, weights_sha256)
  return statistics(extractor.of_files(files, log=log)[0], weights_sha256)


# -------------------------------------------------------------------------------------------- the evaluator

class FidEvaluator(Evaluator):
  """FID and IS of `config.eval.fid.num_images` images sampled by the model against cached reference statistics:
  {'gen/fid', 'gen/is'}. The model supplies `generate(params, rng, n) -> (n, H, W, 3)` images in [0, 1]; batch i
  is drawn with `fold_in(key(config.eval.fid.seed), i)`, the same at every evaluation. The images become uint8
  as the reference's PNGs (`to_uint8`) and never leave the devices; only the features reach the hosts."""

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        inception_weights='',   # the standard file, pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)
        reference='',           # statistics .npz (python -m mae_jax.evaluate.fid stats) or a folder of images
        num_images=10000,       # per evaluation (the paper: 50,000)
        batch_size=64,          # images generated and scored per step (rounded to the devices)
        every_steps=0,          # also every this many training steps (0: before training and at the end)
        trace='sqrtm',          # sqrtm (torch-fidelity 0.3.0, MAGE's numbers) | eigvals (0.4.0)
        isc_splits=10,          # torch-fidelity's
        seed=0,
    ))

  def __init__(self, config, model, train_source, eval_source, mesh):
    del train_source, eval_source
    c = config.eval.fid
    if not callable(getattr(model, 'generate', None)):
      raise ConfigError(f"config.eval.evaluators: 'fid' needs a model that generates images, and "
                        f'{type(model).__name__} (config.objective={config.objective!r}) has no '
                        'generate(params, rng, n)')
    if (c.trace not in TRACES or c.num_images < 2 or not 1 <= c.isc_splits <= c.num_images or c.batch_size < 1
        or c.every_steps < 0):
      raise ConfigError(f'config.eval.fid: trace in {TRACES}, num_images >= 2, 1 <= isc_splits <= num_images, '
                        'batch_size >= 1, every_steps >= 0')
    if not c.reference:
      raise ConfigError(f'config.eval.fid.reference is empty: name the statistics .npz (python -m {PROGRAM} stats) or '
                        'a folder of reference images')
    try:
      variables, sha = inception.load_weights(c.inception_weights)
    except inception.InceptionWeightsError as e:
      raise ConfigError(f'config.eval.fid.inception_weights: {e}') from None
    if jax.process_index() == 0:
      print(f'FID Inception weights {c.inception_weights}: {inception.hash_note(c.inception_weights, sha)}', flush=True)
    self.every_steps, self.num_images, self.trace, self.isc_splits, self.seed = (
        c.every_steps, c.num_images, c.trace, c.isc_splits, c.seed)
    self.extractor = InceptionFeatures(variables, mesh, c.batch_size)
    try:
      self.reference = reference_statistics(c.reference, self.extractor, sha)
    except FidError as e:
      raise ConfigError(f'config.eval.fid.reference={c.reference!r}: {e}') from None
    batch = self.extractor.batch_size
    self.generate = jax.jit(lambda params, rng: to_uint8(model.generate(params, rng, batch)),
                            out_shardings=sharding.batch_sharding(mesh))

  def __call__(self, params):
    key, batch = jax.random.key(self.seed), self.extractor.batch_size
    pools, logits = [], []
    for i, start in enumerate(range(0, self.num_images, batch)):
      pool, logit = self.extractor(self.generate(params, jax.random.fold_in(key, i)))
      pools.append(pool[:self.num_images - start])
      logits.append(logit[:self.num_images - start])
    stats = statistics(np.concatenate(pools))
    return {'gen/fid': fid_from_statistics(stats, self.reference, self.trace),
            'gen/is': inception_score(np.concatenate(logits), self.isc_splits)[0]}


# --------------------------------------------------------------------------------------------- the commands

def resize_center_crop(image, size=REFERENCE_SIZE):
  """torchvision's Resize(size) (PIL bilinear, shorter side to `size`, the longer int(size * long / short)) and
  CenterCrop(size), on a PIL image: prepare_imgnet_val.py's transform."""
  w, h = image.size
  new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BILINEAR)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def prepare_reference(imagenet_val, out, num_workers=None, log=print):
  """Writes `imagenet_val`'s images (class folders, ImageFolder's order) as `out/{i:05d}.png` at 256 px; files
  already there are kept, so an interrupted run resumes. Returns the number of images."""
  folder = os.path.abspath(imagenet_val)
  if not os.path.isdir(folder):
    raise FidError(f'{imagenet_val} is not a folder (ImageNet-val as <class>/<images>, e.g. /data/imagenet/val)')
  source = sources.FolderSource(os.path.dirname(folder), os.path.basename(folder))
  os.makedirs(out, exist_ok=True)

  def write(index):
    path = os.path.join(out, f'{index:05d}.png')
    if not os.path.exists(path):
      try:
        image = resize_center_crop(decode.open_rgb(source.path(index)))
      except decode.BadImage as e:
        raise FidError(f'{source.path(index)}: {e}') from None
      image.save(path + '.partial', format='PNG')
      os.replace(path + '.partial', path)  # no truncated PNG is left behind

  with concurrent.futures.ThreadPoolExecutor(num_workers or loader.default_num_workers()) as pool:
    for done, _ in enumerate(pool.map(write, range(len(source))), 1):
      if done % 1000 == 0 or done == len(source):
        log(f'{done}/{len(source)} images written to {out}')
  return len(source)


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    cli.fail(PROGRAM, message)


def _parse(argv):
  parser = _Parser(prog=f'python -m {PROGRAM}', description=__doc__.split('\n\n', maxsplit=1)[0])
  verbs = parser.add_subparsers(dest='verb')
  score = verbs.add_parser('score', help='FID and IS of --generated against --reference (the default verb)')
  score.add_argument('--generated', required=True, help='folder of generated images')
  score.add_argument('--reference', required=True, help='folder of reference images, or their statistics .npz')
  score.add_argument('--trace', choices=TRACES, default='sqrtm',
                     help='sqrtm: torch-fidelity 0.3.0 (MAGE\'s numbers); eigvals: 0.4.0')
  score.add_argument('--isc_splits', type=int, default=10, help='splits of the Inception Score (torch-fidelity: 10)')
  stats = verbs.add_parser('stats', help='write the statistics .npz of a folder (a cached --reference)')
  stats.add_argument('--images', required=True)
  stats.add_argument('--out', required=True, help='the .npz to write')
  for sub in (score, stats):
    sub.add_argument('--inception_weights', required=True, help=f'the standard file, {inception.WEIGHTS_FILE}')
    sub.add_argument('--batch_size', type=int, default=64)
  prepare = verbs.add_parser('prepare-reference', help='ImageNet-val at 256 px as PNGs, the reference\'s way')
  prepare.add_argument('--imagenet_val', required=True, help='the val folder: <class>/<images>')
  prepare.add_argument('--out', required=True)
  prepare.add_argument('--num_workers', type=int, default=0, help='decoding threads (0: one per core, at most 32)')
  random_weights = verbs.add_parser('random-weights', help='a random-weight Inception file: smoke runs only')
  random_weights.add_argument('--out', required=True)
  random_weights.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv if argv[:1] and argv[0] in verbs.choices or argv[:1] in (['-h'], ['--help'])
                           else ['score'] + argv)
  if getattr(args, 'batch_size', 1) < 1 or getattr(args, 'isc_splits', 1) < 1:
    parser.error('--batch_size and --isc_splits must be positive')
  return args


def _log(message):
  print(message, file=sys.stderr, flush=True)


def _extractor(args):
  variables, sha = inception.load_weights(args.inception_weights)
  _log(f'Inception weights {args.inception_weights}: {inception.hash_note(args.inception_weights, sha)}')
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  return InceptionFeatures(variables, mesh, args.batch_size), sha


def run(args):
  """The verb's work; prints the metrics (torch-fidelity's `name: value` lines) on stdout."""
  if args.verb == 'prepare-reference':
    prepare_reference(args.imagenet_val, args.out, args.num_workers or None, _log)
  elif args.verb == 'random-weights':
    inception.save_torch(inception.random_variables(args.seed), args.out)
    _log(f'wrote random Inception weights to {args.out}: for smoke runs only, their FID/IS mean nothing')
  elif args.verb == 'stats':
    files = image_files(args.images)
    extractor, sha = _extractor(args)
    stats = statistics(extractor.of_files(files, log=_log)[0], sha)
    save_statistics(stats, args.out)
    _log(f'wrote the statistics of {stats["count"]} images to {args.out}')
  else:
    generated = image_files(args.generated)
    reference_files(args.reference)  # checked before the weights are read
    extractor, sha = _extractor(args)
    reference = reference_statistics(args.reference, extractor, sha, _log)
    pool, logits = extractor.of_files(generated, log=_log)
    isc_mean, isc_std = inception_score(logits, args.isc_splits)
    distance = fid_from_statistics(statistics(pool), reference, args.trace)
    print(f'inception_score_mean: {isc_mean:.7g}\ninception_score_std: {isc_std:.7g}\n'
          f'frechet_inception_distance: {distance:.7g}', flush=True)


def main(argv=None):
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    run(args)
  except (FidError, inception.InceptionWeightsError, ConfigError) as e:  # ConfigError: sources.DataError
    cli.fail(PROGRAM, ' '.join(str(e).split()))


if __name__ == '__main__':
  main()
