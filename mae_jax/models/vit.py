"""The shared Vision Transformer (Flax Linen, pure functional).

Submodule names mirror the PyTorch layout of facebookresearch/mae and timm (`patch_embed/proj`,
`blocks_3/attn/qkv`, `blocks_3/mlp/fc1`, `norm`), so exporting to PyTorch is a table of renames and
transposes. Numerics follow the reference: fused qkv with bias, exact (erf) GELU, LayerNorm eps 1e-6,
pre-norm blocks, attention logits and softmax in fp32 whatever the compute dtype.
"""
import math
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


def compute_dtype(model_config):
  """config.model.dtype as a dtype. 'auto' is bfloat16 on GPUs and TPUs (the reference trains under autocast;
  params, optimizer and softmax stay float32) and float32 on CPUs, which have no fast bfloat16 matmul."""
  if model_config.dtype == 'auto':
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32)
  return jnp.dtype(model_config.dtype)


def remat_option(model_config):
  """config.model.remat and remat_policy -> what `make_blocks` takes: False or a REMAT_POLICIES name."""
  return model_config.remat and model_config.get('remat_policy', 'full')


# torch.nn.Linear / nn.Conv2d weights in the reference are xavier_uniform "like nn.Linear".
dense_init = nn.initializers.xavier_uniform()
patch_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=-1)
token_init = nn.initializers.normal(stddev=0.02)


def timm_trunc_normal(std):
  """timm's `trunc_normal_(std=std)`: its bounds are absolute (+-2), so for a small std it is a plain normal."""
  return nn.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


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


def learned_table_init(kind, grid_size, num_prefix_tokens, normal):
  """The initializer of a learned position table (1, prefix + h*w, D): `normal` (the reference's random init)
  or, for kind 'sincos', MAE's 2-D sin-cos table with zero prefix rows, a start that already knows the grid's
  geometry (neighbouring positions alike), which a short schedule cannot afford to learn."""
  if kind == 'normal':
    return normal
  if kind != 'sincos':
    raise ValueError(f"position table init {kind!r}: expected 'normal' or 'sincos'")

  def init(key, shape, dtype=jnp.float32):
    del key
    table = posemb_sincos_2d(shape[-1], grid_size, cls_token=False)
    return jnp.asarray(np.pad(table, ((num_prefix_tokens, 0), (0, 0)))[None], dtype)
  return init


def _cubic_weights(in_size, out_size, a=-0.75):
  """(out, in) matrix of PyTorch's bicubic resampling along one axis (align_corners=False, no antialias):
  source x = (dst + 0.5) * in / out - 0.5, Keys' kernel with PyTorch's A = -0.75, taps clamped at the borders."""
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  left = np.floor(src)
  t = src - left
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
  weights = np.zeros((out_size, in_size))
  for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
    np.add.at(weights, (np.arange(out_size), np.clip(left + offset, 0, in_size - 1).astype(int)), w)
  return weights


def resample_posemb(table, new_grid, num_prefix_tokens=1):
  """Resizes a learned position table (..., prefix + h*h, D) of a square grid to `new_grid` ((h, w) or an
  int), keeping the prefix (cls) rows: timm's `resample_abs_pos_embed` (torch bicubic, align_corners=False,
  no antialias), in numpy. jax.image.resize's cubic kernel (A = -0.5) would give other values."""
  table = np.asarray(table)
  new_h, new_w = (new_grid, new_grid) if np.ndim(new_grid) == 0 else tuple(new_grid)
  prefix, patches = table[..., :num_prefix_tokens, :], table[..., num_prefix_tokens:, :]
  side = math.isqrt(patches.shape[-2])
  if side * side != patches.shape[-2]:
    raise ValueError(f'position table {table.shape} with {num_prefix_tokens} prefix tokens is not of a square grid')
  if (new_h, new_w) == (side, side):
    return table
  grid = patches.reshape(patches.shape[:-2] + (side, side, patches.shape[-1])).astype(np.float64)
  grid = np.einsum('oh,...hwd,pw->...opd', _cubic_weights(side, new_h), grid, _cubic_weights(side, new_w))
  patches = grid.reshape(grid.shape[:-3] + (new_h * new_w, grid.shape[-1])).astype(table.dtype)
  return np.concatenate([prefix, patches], axis=-2)


def torch_default_bias_init(fan_in):
  """PyTorch's default Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the reference keeps it."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PatchEmbed(nn.Module):
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  use_bias: bool = True  # CLIP's conv1 has none

  @nn.compact
  def __call__(self, images):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, use_bias=self.use_bias,
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


def _attention_weights(q, k):
  """The float32 softmax(q k^T / sqrt(d)) of head-major (n, h, L, d) operands."""
  logits = jnp.einsum('nhqd,nhkd->nhqk', q, k, preferred_element_type=jnp.float32) * q.shape[-1]**-0.5
  return jax.nn.softmax(logits, axis=-1)


def _attention_forward(q, k, v):
  weights = _attention_weights(q, k).astype(q.dtype)
  out = jnp.einsum('nhqk,nhkd->nhqd', weights, v)
  return out, (q, k, v, weights, out)


def _attention_backward(residuals, d_out):
  q, k, v, weights, out = residuals
  d_weights = jnp.einsum('nhqd,nhkd->nhqk', d_out, v, preferred_element_type=jnp.float32)
  d_v = jnp.einsum('nhqk,nhqd->nhkd', weights, d_out)
  # Softmax backward in the flash-attention form: rowsum(dO * O) instead of rowsum(dP * P) over L x L.
  row = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1, keepdims=True)
  d_logits = (weights * (d_weights - row) * q.shape[-1]**-0.5).astype(q.dtype)
  return jnp.einsum('nhqk,nhkd->nhqd', d_logits, k), jnp.einsum('nhqk,nhqd->nhkd', d_logits, q), d_v


@jax.custom_vjp
def attention_core(q, k, v):
  """softmax(q k^T / sqrt(d)) v on head-major (n, h, L, d) operands, without attention dropout.

  The hand-written backward saves XLA:CPU's autodiff of the softmax (its L x L intermediates and transposes):
  the decoder's attention forward + backward is ~20% faster on CPU (docs/performance.md).
  """
  return _attention_forward(q, k, v)[0]


attention_core.defvjp(_attention_forward, _attention_backward)


class Attention(nn.Module):
  """timm's Attention: `attn_dropout` on the attention weights, `proj_dropout` after the projection."""
  num_heads: int
  dtype: Any = jnp.float32
  attn_dropout: float = 0.0
  proj_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    n, length, dim = x.shape
    head_dim = dim // self.num_heads
    # Rows of the fused kernel are [q | k | v], each head-major: the reference's reshape(B, N, 3, H, C/H).
    qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=dense_init, name='qkv')(x)
    qkv = qkv.reshape(n, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if not deterministic and self.attn_dropout:
      q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
      weights = nn.Dropout(self.attn_dropout)(_attention_weights(q, k), deterministic).astype(self.dtype)
      out = jnp.einsum('nhqk,nhkd->nqhd', weights, v)
    elif jax.default_backend() == 'gpu':
      # cuDNN's fused (flash) attention where it applies (bf16/fp16 inputs), XLA's otherwise; fp32 softmax.
      out = jax.nn.dot_product_attention(q, k, v, implementation=None)
    else:
      out = attention_core(*(x.transpose(0, 2, 1, 3) for x in (q, k, v))).transpose(0, 2, 1, 3)
    out = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='proj')(out.reshape(n, length, dim))
    return nn.Dropout(self.proj_dropout)(out, deterministic)


def quick_gelu(x):
  """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {'gelu': lambda x: nn.gelu(x, approximate=False), 'quick_gelu': quick_gelu}


class Mlp(nn.Module):
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = 'gelu'  # a key of ACTIVATIONS

  @nn.compact
  def __call__(self, x, deterministic):
    dim = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init, name='fc1')(x)
    x = ACTIVATIONS[self.act](x)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class Block(nn.Module):
  """Pre-norm transformer block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x))).

  `dropout` is timm's `drop` (after the attention projection and in the MLP), `attn_dropout` its `attn_drop`.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32
  attn_dropout: float = 0.0
  norm_eps: float = 1e-6
  act: str = 'gelu'

  @nn.compact
  def __call__(self, x, train=False):
    deterministic = not train
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm1')(x)
    y = Attention(self.num_heads, self.dtype, self.attn_dropout, self.dropout, name='attn')(y, deterministic)
    x = x + DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm2')(x)
    y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.dropout, self.dtype, self.act, name='mlp')(y, deterministic)
    return x + DropPath(self.drop_path)(y, deterministic)


def make_blocks(depth, num_heads, mlp_ratio, drop_path_rate, dropout, dtype, remat, attn_dropout=0.0, norm_eps=1e-6,
                act='gelu'):
  """`depth` blocks with drop-path rates linearly spaced from 0, optionally rematerialised (`remat`: False,
  True or a REMAT_POLICIES name)."""
  policy = REMAT_POLICIES[remat if isinstance(remat, str) else 'full']
  block = nn.remat(Block, static_argnums=(2,), policy=policy) if remat else Block
  rates = np.linspace(0.0, drop_path_rate, depth) if depth else []
  return [block(num_heads, mlp_ratio, float(rate), dropout, dtype, attn_dropout, norm_eps, act) for rate in rates]


def add_readout(model):
  """In a ViT's or ConvViT's `setup`: the final `norm` (`fc_norm` with pool='gap') and, with classes, the head."""
  if model.pool == 'gap':
    model.fc_norm = nn.LayerNorm(epsilon=model.norm_eps, dtype=model.dtype)
  else:
    model.norm = nn.LayerNorm(epsilon=model.norm_eps, dtype=model.dtype)
  if model.num_classes:
    model.head = nn.Dense(model.num_classes, dtype=model.dtype, kernel_init=timm_trunc_normal(model.head_init_std),
                          bias_init=nn.initializers.zeros, use_bias=getattr(model, 'head_bias', True))


def readout(model, x, out):
  """`out` with the 'tokens', 'pooled' and 'logits' (see `ViT.__call__`) of the last block's output `x`."""
  if model.pool == 'gap':
    out['pooled'] = model.fc_norm(x[:, model.num_prefix_tokens:].mean(axis=1))
  else:
    out['tokens'] = model.norm(x)
    if model.pool == 'cls':
      out['pooled'] = out['tokens'][:, 0]
  if model.num_classes:
    out['logits'] = model.head(out['pooled']).astype(jnp.float32)
  return out


class ViT(nn.Module):
  """The one configurable ViT: every objective's encoder, the fine-tuned classifier and the discriminator.

  Options in the manner of big_vision's `vit.py`: the stem (pixel patches or token ids), the position
  table (fixed sin-cos or learned), an optional cls token, the pooling and a classifier head. The defaults
  are MAE's encoder, whose param paths and initial values the checkpoints depend on. `ids_keep` selects
  the visible tokens (MAE's encoder); without it every token is encoded.

  MAGE's encoder is BERT's embedding over VQGAN ids: `stem='tokens'` with `prefix_ids=1` (the first input
  id is a real token, the fake class id, not a cls param: it has the first row of the learned table and is
  always kept), `norm_embeddings` (LayerNorm eps 1e-6) and `embed_dropout` after the position embedding.

  The frozen teachers (`mae_jax.models.teachers`) are options too: CLIP's tower is `patch_bias=False`,
  `pre_norm` (its ln_pre, over the cls token as well), `norm_eps=1e-5`, `act='quick_gelu'` and a bias-free
  `head` (its projection) on the cls token; DINO's is timm's ViT with a learned table.
  """
  img_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False
  stem: str = 'patch'  # 'patch': NHWC pixels; 'tokens': int ids (N, prefix_ids + grid^2), e.g. MAGE's VQGAN codes
  vocab_size: int = 0
  prefix_ids: int = 0  # leading input ids that are prefix tokens (MAGE's fake class id); needs a learned table
  norm_embeddings: bool = False  # LayerNorm `embed_norm` after the position embedding (BERT's, MAGE's)
  embed_dropout: float = 0.0
  token_init_std: float = 0.02  # the token stem's init (BERT's and MAGE's 0.02)
  posemb: str = 'sincos'  # 'sincos': fixed, not a param; 'learned': param `pos_embed`
  posemb_init: str = 'normal'  # a learned table's init: 'normal' (timm's 0.02) or 'sincos' (learned_table_init)
  cls_token: bool = True
  pool: str = 'none'  # 'cls': token 0 after `norm`; 'gap': `fc_norm` of the mean patch token, no `norm`
  num_classes: int = 0
  head_init_std: float = 2e-5
  head_bias: bool = True
  patch_bias: bool = True
  pre_norm: bool = False  # LayerNorm `norm_pre` over every token before the blocks (CLIP's ln_pre; timm's names)
  norm_eps: float = 1e-6  # of every LayerNorm but embed_norm
  act: str = 'gelu'  # the MLPs' activation, a key of ACTIVATIONS

  @property
  def grid_size(self):
    return (self.img_size // self.patch_size,) * 2

  @property
  def num_patches(self):
    return self.grid_size[0] * self.grid_size[1]

  @property
  def num_prefix_tokens(self):
    return int(self.cls_token) + self.prefix_ids

  def _check_options(self):
    problems = []
    if self.img_size % self.patch_size:
      problems.append(f'img_size {self.img_size} is not divisible by patch_size {self.patch_size}')
    if self.stem not in ('patch', 'tokens') or (self.stem == 'tokens' and self.vocab_size < 1):
      problems.append(f"stem {self.stem!r} (vocab_size {self.vocab_size}): expected 'patch' or 'tokens' with a vocab")
    if self.posemb not in ('sincos', 'learned'):
      problems.append(f"posemb {self.posemb!r}: expected 'sincos' or 'learned'")
    if self.prefix_ids and (self.stem != 'tokens' or self.posemb != 'learned' or self.cls_token):
      problems.append(f"prefix_ids {self.prefix_ids}: needs stem 'tokens', posemb 'learned' and no cls token")
    if self.pool not in ('none', 'cls', 'gap') or (self.pool == 'cls' and not self.num_prefix_tokens):
      problems.append(f"pool {self.pool!r}: expected 'none', 'gap' or 'cls' (which needs the cls token)")
    if self.num_classes and self.pool == 'none':
      problems.append(f'a head of {self.num_classes} classes needs pooled features: set pool')
    if self.act not in ACTIVATIONS:
      problems.append(f'act {self.act!r}: expected one of {sorted(ACTIVATIONS)}')
    if problems:
      raise ValueError('ViT: ' + '; '.join(problems))

  def setup(self):
    self._check_options()
    if self.stem == 'patch':
      self.patch_embed = PatchEmbed(self.patch_size, self.width, self.dtype, self.patch_bias)
    else:
      self.token_embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                                  embedding_init=nn.initializers.normal(stddev=self.token_init_std))
    # Created first among the top-level params: the rng each one draws depends on the order.
    self.cls = self.param('cls_token', token_init, (1, 1, self.width)) if self.cls_token else None
    num_tokens = self.num_prefix_tokens + self.num_patches
    if self.posemb == 'learned':
      init = learned_table_init(self.posemb_init, self.grid_size, self.num_prefix_tokens, timm_trunc_normal(0.02))
      self.pos_embed = self.param('pos_embed', init, (1, num_tokens, self.width))
    else:
      self.pos_embed = jnp.asarray(posemb_sincos_2d(self.width, self.grid_size, self.cls_token))[None]
    if self.norm_embeddings:
      self.embed_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.embed_drop = nn.Dropout(self.embed_dropout)
    if self.pre_norm:
      self.norm_pre = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)
    self.blocks = make_blocks(self.depth, self.num_heads, self.mlp_ratio, self.drop_path_rate, self.dropout,
                              self.dtype, self.remat, self.attn_dropout, self.norm_eps, self.act)
    add_readout(self)

  def __call__(self, inputs, ids_keep: Optional[jax.Array] = None, train: bool = False):
    """inputs: images (N, H, W, C) or token ids (N, prefix_ids + L); ids_keep: optional (N, K) patch indices
    to keep (the prefix ids are always kept, in front).

    Returns a dict (jit drops what the caller does not use):
      embedded: (N, prefix_ids + L, D) stem + position (+ embed_norm, dropout), every token, before the selection.
      block_input: the first block's input, (N, prefix + K, D) (after norm_pre; HF's hidden_states[0]).
      blocks: each block's output tokens, (N, prefix + K, D).
      pre_norm: the last block's output.
      tokens: `norm(pre_norm)`; absent with pool='gap'.
      pooled: (N, D) with a pool.
      logits: (N, num_classes) in fp32 with a head.
    """
    stem = self.patch_embed if self.stem == 'patch' else self.token_embed
    # The cls param's row comes first; the inputs (prefix ids included) take the rest.
    x = stem(inputs) + self.pos_embed[:, int(self.cls_token):].astype(self.dtype)
    if self.norm_embeddings:
      x = self.embed_norm(x)
    x = self.embed_drop(x, not train)
    out = {'embedded': x}
    if ids_keep is not None:
      x = jnp.concatenate([x[:, :self.prefix_ids], masking.gather(x[:, self.prefix_ids:], ids_keep)], axis=1)
    if self.cls_token:
      cls = jnp.broadcast_to(self.cls + self.pos_embed[:, :1], (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    if self.pre_norm:
      x = self.norm_pre(x)
    out['block_input'] = x
    blocks = []
    for block in self.blocks:
      x = block(x, train)
      blocks.append(x)
    out.update(blocks=tuple(blocks), pre_norm=x)
    return readout(self, x, out)


def encoder_from_config(model_config, img_size, **overrides):
  """Builds a ViT from `config.model` (variant, mlp ratio, drop path, dropout, dtype, remat); `overrides`
  set the other options (posemb='learned', pool='gap', num_classes=1000, ...). A 'conv...' variant is ConvMAE's
  hybrid ConvViT (`mae_jax.models.convvit`), with the same interface and `config.model.convvit`'s options."""
  common = dict(img_size=img_size, mlp_ratio=model_config.mlp_ratio, drop_path_rate=model_config.drop_path_rate,
                dropout=model_config.dropout, dtype=compute_dtype(model_config), remat=remat_option(model_config))
  if model_config.variant.startswith('conv'):
    from mae_jax.models import convvit  # late: it builds on this module
    dims = convvit.parse_variant(model_config.variant)
    del dims['stage_patches']  # a property of the ConvViT (the patch size's)
    options = dict(cls_token=model_config.convvit.cls_token, fusion=model_config.convvit.fusion)
    return convvit.ConvViT(**dims, **common, **{**options, **overrides})
  return ViT(**parse_variant(model_config.variant), **common, **overrides)
