"""The shared Vision Transformer (Flax Linen, pure functional).

Submodule names mirror the PyTorch layout of facebookresearch/mae and timm (`patch_embed/proj`,
`blocks_3/attn/qkv`, `blocks_3/mlp/fc1`, `norm`), so exporting to PyTorch is a table of renames and
transposes. Numerics follow the reference: fused qkv with bias, exact (erf) GELU, LayerNorm eps 1e-6,
pre-norm blocks, attention logits and softmax in fp32 whatever the compute dtype.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import masking

# width, depth, heads. Tiny sizes exist for tests and the CPU demo.
VARIANTS = {
    'pico': (32, 2, 2),
    'nano': (64, 4, 4),
    'Ti': (192, 12, 3),
    'S': (384, 12, 6),
    'B': (768, 12, 12),
    'L': (1024, 24, 16),
    'H': (1280, 32, 16),
}

# What a rematerialised block keeps for the backward pass (config.model.remat_policy). 'full' keeps nothing
# and recomputes the whole block; 'dots' keeps every matmul output; 'dots_no_batch' keeps the linear layers'
# outputs and recomputes attention (its einsums have batch dimensions).
REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_option(model_config):
  """config.model.remat and remat_policy -> what `make_blocks` takes: False or a REMAT_POLICIES name."""
  return model_config.remat and model_config.get('remat_policy', 'full')


# torch.nn.Linear / nn.Conv2d weights in the reference are xavier_uniform "like nn.Linear".
dense_init = nn.initializers.xavier_uniform()
patch_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


def parse_variant(variant):
  """'B/16' -> dict(width=768, depth=12, num_heads=12, patch_size=16)."""
  name, _, patch = variant.partition('/')
  if name not in VARIANTS or not patch.isdigit():
    raise ValueError(f'unknown ViT variant {variant!r}; expected <size>/<patch> with size in {sorted(VARIANTS)}')
  width, depth, heads = VARIANTS[name]
  return dict(width=width, depth=depth, num_heads=heads, patch_size=int(patch))


def posemb_sincos_2d(dim, grid_size, cls_token=True):
  """MAE's fixed 2-D sin-cos table, (1 + h*w, dim) with a zero row for the cls token.

  For the token at row i, column j: [sin(j w_k), cos(j w_k), sin(i w_k), cos(i w_k)] with
  w_k = 10000^(-k / (dim/4)). The column comes first (the reference's swapped meshgrid naming, kept
  for checkpoint compatibility). Computed in float64, stored as float32, like the reference.
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embedding needs a width divisible by 4, got {dim}')
  grid_h, grid_w = grid_size
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing='ij')

  def embed_1d(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  table = np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


def torch_default_bias_init(fan_in):
  """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the reference keeps it."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PatchEmbed(nn.Module):
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                kernel_init=patch_kernel_init, bias_init=torch_default_bias_init(p * p * images.shape[-1]),
                name='proj')(images)
    n, h, w, d = x.shape
    return x.reshape(n, h * w, d)


class DropPath(nn.Module):
  """Stochastic depth: drops the residual branch per sample and rescales the survivors."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    survive = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(survive, x / keep, 0.0).astype(x.dtype)


class Attention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, length, dim = x.shape
    head_dim = dim // self.num_heads
    # Rows of the fused kernel are [q | k | v], each head-major: the reference's reshape(B, N, 3, H, C/H).
    qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=dense_init, name='qkv')(x)
    qkv = qkv.reshape(n, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, length, dim)
    return nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='proj')(out)


class Mlp(nn.Module):
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    deterministic = not train
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dtype, name='attn')(y)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dropout, self.dtype, name='mlp')(y, deterministic)
    return x + DropPath(self.drop_path)(y, deterministic)


def make_blocks(depth, num_heads, mlp_ratio, drop_path_rate, dropout, dtype, remat):
  """`depth` blocks with drop-path rates linearly spaced from 0, optionally rematerialised (`remat`: False,
  True or a REMAT_POLICIES name)."""
  policy = REMAT_POLICIES[remat if isinstance(remat, str) else 'full']
  block = nn.remat(Block, static_argnums=(2,), policy=policy) if remat else Block
  rates = np.linspace(0.0, drop_path_rate, depth) if depth else []
  return [block(num_heads, mlp_ratio, float(rate), dropout, dtype) for rate in rates]


class ViTEncoder(nn.Module):
  """ViT encoder with a cls token and fixed sin-cos position embeddings.

  Called with `noise`, it keeps only the visible patches (MAE's encoder); without, it encodes every
  patch (features, fine-tuning, GAN-MAE's discriminator).
  """
  img_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def grid_size(self):
    return (self.img_size // self.patch_size,) * 2

  @property
  def num_patches(self):
    return self.grid_size[0] * self.grid_size[1]

  def setup(self):
    if self.img_size % self.patch_size:
      raise ValueError(f'img_size {self.img_size} is not divisible by patch_size {self.patch_size}')
    self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype)
    self.cls_token = self.param('cls_token', token_init, (1, 1, self.width))
    self.pos_embed = jnp.asarray(posemb_sincos_2d(self.width, self.grid_size))  # fixed, not trained
    self.blocks = make_blocks(self.depth, self.num_heads, self.mlp_ratio, self.drop_path_rate, self.dropout,
                              self.dtype, self.remat)
    self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)

  def __call__(self, images, noise: Optional[jax.Array] = None, mask_ratio: float = 0.0, train: bool = False):
    """images (N, H, W, C) -> (tokens (N, 1 + kept, D) after the final norm, mask, ids_restore).

    mask and ids_restore are None when no noise is given (every patch is encoded).
    """
    x = self.patch_embed(images) + self.pos_embed[None, 1:].astype(self.dtype)
    mask = ids_restore = None
    if noise is not None:
      x, mask, ids_restore = masking.random_masking(x, noise, mask_ratio)
    cls = jnp.broadcast_to(self.cls_token + self.pos_embed[None, :1], (x.shape[0], 1, self.width))
    x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    for block in self.blocks:
      x = block(x, train)
    return self.norm(x), mask, ids_restore


def encoder_from_config(model_config, img_size):
  """Builds the shared encoder from `config.model` (variant, drop path, dtype, remat)."""
  return ViTEncoder(img_size=img_size, **parse_variant(model_config.variant), mlp_ratio=model_config.mlp_ratio,
                    drop_path_rate=model_config.drop_path_rate, dropout=model_config.dropout,
                    dtype=jnp.dtype(model_config.dtype), remat=remat_option(model_config))
