"""MaskGIT's VQGAN tokenizer, the one MAGE uses (spec mage.md 1.1), in Flax Linen, NHWC, [0, 1] images.

No attention anywhere; GroupNorm(eps 1e-6) and swish; residual blocks of two bias-free 3x3 convolutions whose
1x1 bias-free shortcut, when the width changes, maps the block's *output* (MaskGIT's quirk, kept by MAGE's
PyTorch port); 2x2 average-pool downsampling after every level but the last; nearest x2 upsampling and a 3x3
convolution with bias before every level but the first; a codebook with squared-distance nearest neighbours.

Submodule names mirror the PyTorch layout of MAGE's `taming` port (`encoder/down_2/block_0/nin_shortcut`,
`decoder/up_1/upsample/conv`, `quantize/embedding`), so `mae_jax/export/tables.py` maps the released
`vqgan_jax_strongaug.ckpt` by a table. The decoder's `up_<level>` is indexed by level and run from the last
level to the first, as the reference's `up[level]`.
"""
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mae_jax import frozen

# The tiny tokenizer of the CPU demos, trained on the embedded digits by the command in configs/vqgan_tiny_cpu.py.
TINY_DIGITS_TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                                     'vqgan_tiny_digits.msgpack')
GROUPNORM_EPS = 1e-6
MAX_LEVELS = 8  # what the export table covers (MaskGIT has 5 levels; 2^7 = 128x downsampling)


def maskgit_config():
  """The architecture of MaskGIT's tokenizer and MAGE's `config/vqgan.yaml`: 256 px -> 16x16 ids of 1024."""
  return ml_collections.ConfigDict(dict(
      ch=128,                    # width of the first level
      ch_mult=(1, 1, 2, 2, 4),   # per level; len - 1 average-pool downsamplings
      num_res_blocks=2,          # per level, in the encoder and the decoder
      embed_dim=256,             # code width (the encoder's conv_out)
      n_embed=1024,              # codebook entries
      num_groups=32,             # GroupNorm groups
  ))


def tiny_config():
  """The tiny tokenizer of the CPU demos (TINY_DIGITS_TOKENIZER): 32 px -> 8x8 ids of 128."""
  return ml_collections.ConfigDict(dict(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, embed_dim=16, n_embed=128,
                                        num_groups=8))


ARCHITECTURE_FIELDS = tuple(maskgit_config())


def _norm(num_groups, dtype, name):
  # The two-pass variance, as torch's GroupNorm: E[x^2] - E[x]^2 loses digits at 128+ channels.
  return nn.GroupNorm(num_groups=num_groups, epsilon=GROUPNORM_EPS, use_fast_variance=False, dtype=dtype, name=name)


class ResBlock(nn.Module):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus the input, or plus nin_shortcut(output) when the
  width changes (then the input is not added: MaskGIT's `ResBlock` applies the shortcut to the processed x)."""
  features: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda size, name: nn.Conv(self.features, (size, size), use_bias=False, dtype=self.dtype, name=name)
    h = conv(3, 'conv1')(nn.swish(_norm(self.num_groups, self.dtype, 'norm1')(x)))
    h = conv(3, 'conv2')(nn.swish(_norm(self.num_groups, self.dtype, 'norm2')(h)))
    if x.shape[-1] != self.features:
      return conv(1, 'nin_shortcut')(h) + h
    return x + h


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 convolution with bias (taming's `Upsample(with_conv=True)`)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.features, (3, 3), dtype=self.dtype, name='conv')(x)


class Level(nn.Module):
  """`block_0..block_{n-1}` at one width (the reference's `down[l]` / `up[l]`), then `upsample` if asked."""
  features: int
  num_blocks: int
  num_groups: int
  upsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for b in range(self.num_blocks):
      x = ResBlock(self.features, self.num_groups, self.dtype, name=f'block_{b}')(x)
    return Upsample(self.features, self.dtype, name='upsample')(x) if self.upsample else x


class Mid(nn.Module):
  """The two residual blocks at the lowest resolution (`mid.block_1`, `mid.block_2`)."""
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for name in ('block_1', 'block_2'):
      x = ResBlock(x.shape[-1], self.num_groups, self.dtype, name=name)(x)
    return x


class Encoder(nn.Module):
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  embed_dim: int
  num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    h = nn.Conv(self.ch, (3, 3), use_bias=False, dtype=self.dtype, name='conv_in')(images)
    for level, mult in enumerate(self.ch_mult):
      h = Level(self.ch * mult, self.num_res_blocks, self.num_groups, dtype=self.dtype, name=f'down_{level}')(h)
      if level < len(self.ch_mult) - 1:
        h = nn.avg_pool(h, (2, 2), strides=(2, 2))
    h = Mid(self.num_groups, self.dtype, name='mid')(h)
    h = nn.swish(_norm(self.num_groups, self.dtype, 'norm_out')(h))
    return nn.Conv(self.embed_dim, (1, 1), dtype=self.dtype, name='conv_out')(h)


class Decoder(nn.Module):
  """Codes (N, h, w, embed_dim) -> (images, the input of `conv_out`); the latter gives VQGAN's adaptive
  adversarial weight (the gradients at the last layer)."""
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  num_groups: int
  out_ch: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    h = nn.Conv(self.ch * self.ch_mult[-1], (3, 3), dtype=self.dtype, name='conv_in')(z)
    h = Mid(self.num_groups, self.dtype, name='mid')(h)
    for level in reversed(range(len(self.ch_mult))):
      h = Level(self.ch * self.ch_mult[level], self.num_res_blocks, self.num_groups, upsample=level > 0,
                dtype=self.dtype, name=f'up_{level}')(h)
    h = nn.swish(_norm(self.num_groups, self.dtype, 'norm_out')(h))
    return nn.Conv(self.out_ch, (3, 3), dtype=self.dtype, name='conv_out')(h), h


class Codebook(nn.Module):
  """`quantize.embedding.weight` (n_embed, embed_dim), initialised like MaskGIT's codebook."""
  n_embed: int
  embed_dim: int

  @nn.compact
  def __call__(self):
    init = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
    return self.param('embedding', init, (self.n_embed, self.embed_dim))


def nearest_codes(z, codebook):
  """Ids (...,) of the nearest entries of `codebook` (K, D) to `z` (..., D): argmin of |z|^2 + |e|^2 - 2 z.e,
  the reference's expansion of the squared distance, in fp32."""
  z = z.astype(jnp.float32)
  cross = jnp.einsum('...d,kd->...k', z, codebook, precision=jax.lax.Precision.HIGHEST)
  distances = jnp.sum(z**2, -1, keepdims=True) + jnp.sum(codebook**2, -1) - 2 * cross
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def straight_through(z, z_q):
  """z_q in value, the identity's gradient to z (the reference's `z + (z_q - z).detach()`)."""
  return z + jax.lax.stop_gradient(z_q - z)


class VQGAN(nn.Module):
  """encoder -> nearest codebook entries -> decoder. Ids are (N, h * w), row-major like the reference's
  `reshape(B, -1)`; `encode` and `decode` are the tokenizer's two halves, the other methods what training needs."""
  ch: int = 128
  ch_mult: tuple = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embed_dim: int = 256
  n_embed: int = 1024
  num_groups: int = 32
  dtype: Any = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.embed_dim, self.num_groups,
                           self.dtype)
    self.decoder = Decoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.num_groups, dtype=self.dtype)
    self.quantize = Codebook(self.n_embed, self.embed_dim)

  @property
  def downsample(self):
    return 2 ** (len(self.ch_mult) - 1)

  def encode_latents(self, images):
    """Continuous codes z (N, h, w, embed_dim) in fp32, before quantisation."""
    return self.encoder(images).astype(jnp.float32)

  def codebook(self):
    return self.quantize()

  def encode(self, images):
    """[0, 1] images (N, H, W, 3) -> ids (N, h * w)."""
    ids = nearest_codes(self.encode_latents(images), self.codebook())
    return ids.reshape(ids.shape[0], -1)

  def lookup(self, ids):
    """Ids (N, h * w), a square grid -> the codebook rows (N, h, w, embed_dim) (`get_codebook_entry`)."""
    side = round(ids.shape[1] ** 0.5)
    return self.codebook()[ids].reshape(ids.shape[0], side, side, self.embed_dim)

  def decode_latents(self, z_q):
    """Codes (N, h, w, embed_dim) -> (images (N, H, W, 3) in fp32, the decoder's last features)."""
    images, hidden = self.decoder(z_q)
    return images.astype(jnp.float32), hidden

  def decode(self, ids):
    """Ids (N, h * w) -> images (N, H, W, 3), ~[0, 1]."""
    return self.decode_latents(self.lookup(ids))[0]

  def __call__(self, images):
    """The training forward: {'z', 'z_q' (exact codebook rows), 'ids' (N, h, w), 'reconstruction', 'hidden'};
    the decoder sees the straight-through codes, so the reconstruction's gradient reaches the encoder."""
    z = self.encode_latents(images)
    codebook = self.codebook()
    ids = nearest_codes(z, codebook)
    z_q = codebook[ids]
    reconstruction, hidden = self.decode_latents(straight_through(z, z_q).astype(self.dtype))
    return {'z': z, 'z_q': z_q, 'ids': ids, 'reconstruction': reconstruction, 'hidden': hidden}


def from_config(section, dtype=jnp.float32):
  """The VQGAN of a config section holding ARCHITECTURE_FIELDS (config.vqgan, or `tiny_config()`)."""
  sizes = {name: section[name] for name in ARCHITECTURE_FIELDS}
  return VQGAN(**{**sizes, 'ch_mult': tuple(sizes['ch_mult'])}, dtype=dtype)


def abstract_params(module, img_size=None):
  """The module's params as ShapeDtypeStructs (no computation)."""
  size = img_size or 16 * module.downsample
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']


def frozen_network(field, section):
  """A frozen tokenizer (MAGE's) named by config field `field`: a params file holding {'vqgan': ...} (what
  `python -m mae_jax.export import --format=vqgan` writes, or TINY_DIGITS_TOKENIZER), or the workdir of a
  tokenizer run (objective 'vqgan'); either way its 'vqgan' entry, checked against the `section`'s sizes."""
  module = from_config(section)
  return frozen.FrozenNetwork(field, lambda: abstract_params(module), subtree='vqgan')
