"""The FID Inception-v3 in Flax Linen, NHWC: TF's 2015-12-05 graph as pytorch-fid and torch-fidelity port it.

This is torch-fidelity's `FeatureExtractorInceptionV3` (spec downstream_fid_teachers.md 1.2), not torchvision's
`inception_v3`: 1008 classes, no auxiliary head, every convolution bias-free and followed by BatchNorm(eps 1e-3)
in inference mode and a ReLU, the branch average pools of Mixed_5*, Mixed_6b-e and Mixed_7b exclude the padding
(`count_include_pad=False`, as TF's), and Mixed_7c pools its last branch with a max pool (the TF graph's quirk).
The input is already preprocessed (`mae_jax.evaluate.fid.preprocess`: 299 x 299, (x - 128) / 128); the output is
the 2048-d global average pool (FID's feature), `logits_unbiased` = pool @ fc.weight.T without the bias (what
torch-fidelity computes the IS from) and the logits.

Submodules are named as the PyTorch modules (`Mixed_6b/branch7x7dbl_3/conv`, `.../bn`), with BatchNorm's running
statistics in the `batch_stats` collection, so the standard weights file (`pt_inception-2015-12-05-6726825d.pth`,
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`: a state_dict of the same module names) maps by the
table of `torch_key_table`. Convolutions and the fc run at HIGHEST precision: no TF32 on GPUs, as FID is
sensitive to the features' last digits.
"""
import functools
import hashlib
import os
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL_FEATURES = 2048
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_SOURCES = (
    'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth',
    'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth',
)
HIGHEST = jax.lax.Precision.HIGHEST
_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[^.]+$')  # torch.hub's convention: -<sha256 prefix>.pth


class InceptionWeightsError(ValueError):
  """The weights file is missing, unreadable or not the FID Inception's state_dict; the message says why."""


class BasicConv2d(nn.Module):
  """Bias-free convolution -> BatchNorm(eps 1e-3, running statistics) -> ReLU. `padding` is torch's (ph, pw)."""
  features: int
  kernel_size: tuple = (1, 1)
  strides: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((ph, ph), (pw, pw)), use_bias=False,
                precision=HIGHEST, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _conv(name, features, kernel_size=(1, 1), strides=1, padding=(0, 0)):
  return BasicConv2d(features, kernel_size, strides, padding, name=name)


def _avg_pool_tf(x):
  # TF's average pool divides by the number of real (unpadded) inputs; torchvision's counts the padding.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, padding='VALID'):
  return nn.max_pool(x, (3, 3), (strides, strides), padding)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _conv('branch1x1', 64)(x)
    b5 = _conv('branch5x5_2', 64, (5, 5), padding=(2, 2))(_conv('branch5x5_1', 48)(x))
    b3 = _conv('branch3x3dbl_1', 64)(x)
    b3 = _conv('branch3x3dbl_2', 96, (3, 3), padding=(1, 1))(b3)
    b3 = _conv('branch3x3dbl_3', 96, (3, 3), padding=(1, 1))(b3)
    bp = _conv('branch_pool', self.pool_features)(_avg_pool_tf(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv('branch3x3', 384, (3, 3), strides=2)(x)
    bd = _conv('branch3x3dbl_1', 64)(x)
    bd = _conv('branch3x3dbl_2', 96, (3, 3), padding=(1, 1))(bd)
    bd = _conv('branch3x3dbl_3', 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _conv('branch1x1', 192)(x)
    b7 = _conv('branch7x7_1', c7)(x)
    b7 = _conv('branch7x7_2', c7, (1, 7), padding=(0, 3))(b7)
    b7 = _conv('branch7x7_3', 192, (7, 1), padding=(3, 0))(b7)
    bd = _conv('branch7x7dbl_1', c7)(x)
    bd = _conv('branch7x7dbl_2', c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv('branch7x7dbl_3', c7, (1, 7), padding=(0, 3))(bd)
    bd = _conv('branch7x7dbl_4', c7, (7, 1), padding=(3, 0))(bd)
    bd = _conv('branch7x7dbl_5', 192, (1, 7), padding=(0, 3))(bd)
    bp = _conv('branch_pool', 192)(_avg_pool_tf(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = _conv('branch3x3_2', 320, (3, 3), strides=2)(_conv('branch3x3_1', 192)(x))
    b7 = _conv('branch7x7x3_1', 192)(x)
    b7 = _conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = _conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = _conv('branch7x7x3_4', 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (`max_pool=False`: the TF average pool) and Mixed_7c (`max_pool=True`: FIDInceptionE_2)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = _conv('branch1x1', 320)(x)
    b3 = _conv('branch3x3_1', 384)(x)
    b3 = jnp.concatenate([_conv('branch3x3_2a', 384, (1, 3), padding=(0, 1))(b3),
                          _conv('branch3x3_2b', 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = _conv('branch3x3dbl_1', 448)(x)
    bd = _conv('branch3x3dbl_2', 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([_conv('branch3x3dbl_3a', 384, (1, 3), padding=(0, 1))(bd),
                          _conv('branch3x3dbl_3b', 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool(x, strides=1, padding=((1, 1), (1, 1))) if self.max_pool else _avg_pool_tf(x)
    bp = _conv('branch_pool', 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Logits(nn.Module):
  """The fc layer, also returning its product without the bias (torch-fidelity's 'logits_unbiased')."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    unbiased = jnp.dot(x, kernel, precision=HIGHEST)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """(N, H, W, 3) preprocessed images (H, W >= 75) -> {'pool': (N, 2048), 'logits_unbiased', 'logits': (N, 1008)}."""

  @nn.compact
  def __call__(self, x):
    x = _conv('Conv2d_1a_3x3', 32, (3, 3), strides=2)(x)
    x = _conv('Conv2d_2a_3x3', 32, (3, 3))(x)
    x = _max_pool(_conv('Conv2d_2b_3x3', 64, (3, 3), padding=(1, 1))(x))
    x = _conv('Conv2d_3b_1x1', 80)(x)
    x = _max_pool(_conv('Conv2d_4a_3x3', 192, (3, 3))(x))
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, channels in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE(max_pool=False, name='Mixed_7b')(x)
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))
    unbiased, logits = Logits(name='fc')(pool)
    return {'pool': pool, 'logits_unbiased': unbiased, 'logits': logits}


@functools.lru_cache(maxsize=None)  # tracing the 94 convolutions takes seconds; callers only read it
def abstract_variables():
  """{'params', 'batch_stats'} as ShapeDtypeStructs (75 px: the smallest input the strides allow)."""
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))


# (submodule, Flax leaf) -> the PyTorch name of the leaf; the modules above it are named alike in both.
_TORCH_LEAF = {
    ('conv', 'kernel'): 'conv.weight',
    ('bn', 'scale'): 'bn.weight',
    ('bn', 'bias'): 'bn.bias',
    ('bn', 'mean'): 'bn.running_mean',
    ('bn', 'var'): 'bn.running_var',
    ('fc', 'kernel'): 'fc.weight',
    ('fc', 'bias'): 'fc.bias',
}


def torch_key_table():
  """{Flax path (collection, module..., leaf): (PyTorch key, Flax shape)} for every variable of the network."""
  flat = flax.traverse_util.flatten_dict(abstract_variables())
  return {path: ('.'.join(path[1:-2] + (_TORCH_LEAF[path[-2:]],)), leaf.shape) for path, leaf in flat.items()}


def _to_flax(value):
  # torch conv OIHW -> Flax HWIO; torch linear (out, in) -> Flax (in, out).
  return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T if value.ndim == 2 else value


def _to_torch(value):
  return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T if value.ndim == 2 else value


def variables_from_state_dict(state_dict, where='the state_dict'):
  """The Flax variables of a state_dict {torch key: array} in the standard layout; InceptionWeightsError if its
  keys or shapes are not the FID Inception's (BatchNorm's `num_batches_tracked` counters are not weights)."""
  table = torch_key_table()
  keys = {key for key, _ in table.values()}
  given = {key for key in state_dict if not key.endswith('.num_batches_tracked')}
  missing, unexpected = sorted(keys - given), sorted(given - keys)
  if missing or unexpected:
    raise InceptionWeightsError(
        f'{where} is not the FID Inception-v3 state_dict ({len(missing)} of its {len(keys)} keys missing, e.g. '
        f'{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})')
  flat = {}
  for path, (key, shape) in table.items():
    value = _to_flax(np.asarray(state_dict[key]))
    if value.shape != shape or value.dtype.kind != 'f':
      raise InceptionWeightsError(f'{where}: {key} is {state_dict[key].dtype} {tuple(state_dict[key].shape)}, '
                                  f'expected float {tuple(_to_torch(np.zeros(shape)).shape)}')
    flat[path] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_variables(variables):
  """{torch key: np.ndarray} in the standard layout, with BatchNorm's `num_batches_tracked` as torch writes it."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables))
  out = {key: np.ascontiguousarray(_to_torch(np.asarray(flat[path], np.float32)))
         for path, (key, _) in torch_key_table().items()}
  for key in [k for k in out if k.endswith('.bn.running_mean')]:
    out[key.replace('running_mean', 'num_batches_tracked')] = np.zeros((), np.int64)
  return out


def save_torch(variables, path):
  """Writes `variables` as the standard weights file (a plain state_dict, torch.save)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(v) for k, v in state_dict_from_variables(variables).items()}, path)


def sha256(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def hash_note(path, digest):
  """What the SHA-256 says about the file: whether it matches the hash prefix in the file's name (torch.hub's
  convention, which both standard files follow), or that the name carries none."""
  found = _HASH_IN_NAME.search(os.path.basename(path))
  if not found:
    return f'sha256 {digest}'
  if digest.startswith(found[1]):
    return f'sha256 {digest} (matches the -{found[1]} in its name)'
  return (f'WARNING: sha256 {digest} does not start with the -{found[1]} in its name: not the file of that name '
          '(damaged or altered); its FID/IS are not comparable to published ones')


def load_weights(path):
  """(variables, SHA-256 hex digest) of a weights file, read with torch.load(weights_only=True); InceptionWeightsError
  with the reason and where the standard file is got when it is missing or not the FID Inception's."""
  get = f'get {WEIGHTS_FILE} from {WEIGHTS_SOURCES[0]} (or torch-fidelity\'s copy, {WEIGHTS_SOURCES[1]})'
  if not path:
    raise InceptionWeightsError(f'no Inception weights file given: {get}; nothing is downloaded')
  if not os.path.isfile(path):
    raise InceptionWeightsError(f'the Inception weights file {path} does not exist: {get}; nothing is downloaded')
  from mae_jax.export import torch_import  # pylint: disable=g-import-not-at-top  # late: it imports torch
  try:
    state_dict = torch_import.load_state_dict(path)
  except (torch_import.UnreadableFileError, torch_import.UnsafeFileError) as e:
    raise InceptionWeightsError(f'{" ".join(str(e).split())} ({get})') from None
  return variables_from_state_dict(state_dict, path), sha256(path)


def random_variables(seed=0):
  """Random weights for tests and smoke runs (their FID/IS mean nothing): He-normal kernels, so the features stay
  O(1) through the 94 convolutions, and BatchNorm statistics and affine terms spread around the identity, so an
  import that mixed up mean, var, scale or bias would show."""
  rng = np.random.default_rng(seed)
  draw = {'kernel': lambda shape: rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape),
          'scale': lambda shape: rng.uniform(0.8, 1.2, shape),
          'var': lambda shape: rng.uniform(0.5, 1.5, shape),
          'mean': lambda shape: rng.normal(0, 0.1, shape),
          'bias': lambda shape: rng.normal(0, 0.1, shape)}
  flat = flax.traverse_util.flatten_dict(abstract_variables())
  return flax.traverse_util.unflatten_dict(
      {path: draw[path[-1]](leaf.shape).astype(np.float32) for path, leaf in flat.items()})
