"""ConvMAE's hybrid ConvViT (Gao et al. 2022; Alpha-VL/ConvMAE `models_convmae.py`, `models_convvit.py`).

Two convolution stages run on the full-resolution maps before the transformer stage:
  stage 1, 2   `patch_embed{s}` (strided conv -> LayerNorm -> GELU), then `CBlock`s: x + conv2(dwconv5x5(visible *
               conv1(LN(x)))), then x + CMlp(LN(x)) with 1x1 convs.
  stage 3      `patch_embed3` to the final grid, `patch_embed4` (Linear), the fixed sin-cos table, the kept tokens
               only (`ids_keep`, as MAE's encoder), `vit.Block`s.
  fusion       `stage{1,2}_output_decode` (strided convs of the stage maps to the final grid), gathered at the kept
               ids and added to the stage-3 output before the final `norm` (pretraining only: a pooled model, the
               fine-tuned `models_convvit.py`, has none).

The mask of the final grid is upsampled (nearest) to each stage's map and multiplies only the depthwise conv's
input, as in the reference. That is enough for no information to leak from masked patches into kept outputs:
the patch embeddings, 1x1 convs, LayerNorms and fusion convs stay inside a patch's own block of each map (the
strides divide it), and the 5x5 depthwise conv, the only op reaching across patches, sees zeros there.

Param names mirror the reference's state_dict (`patch_embed1/proj`, `blocks1_0/attn` for its depthwise `attn`
conv, `blocks3_4/mlp/fc1`, `stage1_output_decode`), so `export.tables` maps them one to one. The reference's
CBlock and PatchEmbed LayerNorms are torch's default (eps 1e-5); the transformer's are 1e-6. Convs start as
torch's default init, `patch_embed3` as xavier like a Linear (its `initialize_weights`).
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.models import masking, vit

# stage widths, stage depths, heads. A variant '<size>/<p>' has stage patches (p / 4, 2, 2): the total stride p.
VARIANTS = {
    'convpico': ((16, 24, 32), (1, 1, 1), 2),
    'convnano': ((32, 48, 64), (1, 1, 3), 4),
    'convB': ((256, 384, 768), (2, 2, 11), 12),  # ConvMAE's convvit_base_patch16
}
STAGE_NORM_EPS = 1e-5  # torch's default: the reference's CBlock and PatchEmbed build nn.LayerNorm(dim)
# torch's default Conv2d weight init (kaiming_uniform(a=sqrt(5))): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def is_conv(variant):
  return variant.startswith('conv')


def parse_variant(variant):
  """'convB/16' -> dict(widths, depths, num_heads, patch_size=16, stage_patches=(4, 2, 2))."""
  name, _, patch = variant.partition('/')
  if name not in VARIANTS or not patch.isdigit() or int(patch) % 4 or int(patch) < 4:
    raise ValueError(f'unknown ConvViT variant {variant!r}; expected <size>/<patch> with size in {sorted(VARIANTS)} '
                     'and a patch (the total stride) that is a multiple of 4')
  widths, depths, heads = VARIANTS[name]
  return dict(widths=widths, depths=depths, num_heads=heads, patch_size=int(patch),
              stage_patches=(int(patch) // 4, 2, 2))


def encoder_dims(variant):
  """{patch_size, width, depth} of either family's variant ('B/16' or 'convB/16'): what the configs check."""
  if not is_conv(variant):
    return vit.parse_variant(variant)
  dims = parse_variant(variant)
  return dict(patch_size=dims['patch_size'], width=dims['widths'][-1], depth=dims['depths'][-1],
              num_heads=dims['num_heads'])


def visible_map(ids_keep, grid_size, factor, dtype):
  """(N, gh * factor, gw * factor, 1): 1 on the kept patches of the final grid, each as a factor x factor block."""
  n = ids_keep.shape[0]
  visible = jnp.zeros((n, grid_size[0] * grid_size[1]), dtype).at[jnp.arange(n)[:, None], ids_keep].set(1)
  visible = visible.reshape(n, *grid_size, 1)
  return jnp.repeat(jnp.repeat(visible, factor, axis=1), factor, axis=2)


def conv(features, kernel, in_features, dtype, stride=1, kernel_init=torch_conv_init, name=None):
  """A torch-initialised Conv2d with kernel = stride: a patch embedding or a fusion conv."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='VALID', dtype=dtype,
                 kernel_init=kernel_init, bias_init=vit.torch_default_bias_init(kernel * kernel * in_features),
                 name=name)


class PointwiseConv(nn.Module):
  """nn.Conv(features, (1, 1))'s params (kernel (1, 1, in, out): the torch layout through the 'conv' kind) and
  result, computed as a matmul: XLA:CPU's 1x1 convolution gradients are far slower."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', torch_conv_init, (1, 1, x.shape[-1], self.features))
    bias = self.param('bias', vit.torch_default_bias_init(x.shape[-1]), (self.features,))
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype)) + bias.astype(self.dtype)


class DepthwiseConv(nn.Module):
  """nn.Conv(C, (k, k), 'same', feature_group_count=C)'s params and result, computed as k*k shifted multiply-adds:
  XLA:CPU runs grouped convolutions (and their gradients) several times slower than this (docs/convmae.md)."""
  kernel_size: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, (n, h, w, dim) = self.kernel_size, x.shape
    kernel = self.param('kernel', torch_conv_init, (k, k, 1, dim)).astype(self.dtype)
    bias = self.param('bias', vit.torch_default_bias_init(k * k), (dim,)).astype(self.dtype)
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    return sum(padded[:, i:i + h, j:j + w] * kernel[i, j, 0] for i in range(k) for j in range(k)) + bias


class ConvPatchEmbed(nn.Module):
  """The reference's PatchEmbed: Conv(k = s = patch) -> LayerNorm -> GELU, on NHWC maps."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32
  kernel_init: Any = torch_conv_init

  @nn.compact
  def __call__(self, x):
    x = conv(self.width, self.patch_size, x.shape[-1], self.dtype, self.patch_size, kernel_init=self.kernel_init,
             name='proj')(x)
    x = nn.LayerNorm(epsilon=STAGE_NORM_EPS, dtype=self.dtype, name='norm')(x)
    return nn.gelu(x, approximate=False)


class CMlp(nn.Module):
  hidden_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    dim = x.shape[-1]
    x = nn.gelu(PointwiseConv(self.hidden_dim, self.dtype, name='fc1')(x), approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic)
    x = PointwiseConv(dim, self.dtype, name='fc2')(x)
    return nn.Dropout(self.dropout)(x, deterministic)


class CBlock(nn.Module):
  """x + drop_path(conv2(attn(visible * conv1(norm1(x))))), then x + drop_path(mlp(norm2(x))); `attn` is the
  5x5 depthwise conv, the only op that mixes neighbouring positions, so the only one masked."""
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, visible=None, train=False):
    dim, deterministic = x.shape[-1], not train
    y = PointwiseConv(dim, self.dtype, name='conv1')(nn.LayerNorm(epsilon=STAGE_NORM_EPS, dtype=self.dtype,
                                                                 name='norm1')(x))
    if visible is not None:
      y = y * visible.astype(y.dtype)
    y = PointwiseConv(dim, self.dtype, name='conv2')(DepthwiseConv(5, self.dtype, name='attn')(y))
    x = x + vit.DropPath(self.drop_path)(y, deterministic)
    y = nn.LayerNorm(epsilon=STAGE_NORM_EPS, dtype=self.dtype, name='norm2')(x)
    y = CMlp(int(dim * self.mlp_ratio), self.dropout, self.dtype, name='mlp')(y, deterministic)
    return x + vit.DropPath(self.drop_path)(y, deterministic)


class ConvViT(nn.Module):
  """The hybrid encoder, with `vit.ViT`'s interface: `(images, ids_keep, train)` -> the same dict, and its
  `grid_size`, `num_patches`, `patch_size` (the total stride), `width`, `depth` (stage 3's), `posemb`,
  `cls_token`, `num_prefix_tokens`.

  `cls_token`: ConvMAE v1 has none; v2 (MR-MCMAE) adds one (issue #19), here MAE's: a param with the zero row
  of the sin-cos table, in front of the kept tokens, untouched by the fusion (UNVERIFIED, no v2 code exists).
  Drop path is spaced linearly over all the blocks of the three stages, as the reference's fine-tuning model.
  """
  img_size: int = 224
  patch_size: int = 16
  widths: tuple = (256, 384, 768)
  depths: tuple = (2, 2, 11)
  num_heads: int = 12
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False
  posemb: str = 'sincos'  # 'sincos': fixed; 'learned': param `pos_embed` (fine-tuning)
  cls_token: bool = False
  fusion: bool = True  # the stage outputs added before the final norm; only without pooling (pretraining)
  pool: str = 'none'  # 'gap': fc_norm of the mean patch token (models_convvit.py global_pool); 'cls'
  num_classes: int = 0
  head_init_std: float = 2e-5
  norm_eps: float = 1e-6

  @property
  def width(self):
    return self.widths[-1]

  @property
  def depth(self):
    return self.depths[-1]

  @property
  def stage_patches(self):
    return (self.patch_size // 4, 2, 2)

  @property
  def grid_size(self):
    return (self.img_size // self.patch_size,) * 2

  @property
  def num_patches(self):
    return self.grid_size[0] * self.grid_size[1]

  @property
  def num_prefix_tokens(self):
    return int(self.cls_token)

  @property
  def fuses(self):
    return self.fusion and self.pool == 'none'

  def setup(self):
    problems = []
    if self.img_size % self.patch_size or self.patch_size % 4:
      problems.append(f'img_size {self.img_size} must be a multiple of the patch size {self.patch_size}, itself one of 4')
    if self.posemb not in ('sincos', 'learned') or self.pool not in ('none', 'cls', 'gap'):
      problems.append(f"posemb {self.posemb!r}, pool {self.pool!r}: expected 'sincos' | 'learned', 'none' | 'cls' | 'gap'")
    if (self.pool == 'cls' and not self.cls_token) or (self.num_classes and self.pool == 'none'):
      problems.append(f"pool {self.pool!r} with cls_token={self.cls_token}, {self.num_classes} classes: 'cls' needs "
                      'the cls token, a head needs a pool')
    if problems:
      raise ValueError('ConvViT: ' + '; '.join(problems))
    p1, p2, p3 = self.stage_patches
    w1, w2, w3 = self.widths
    self.patch_embed1 = ConvPatchEmbed(p1, w1, self.dtype)
    self.patch_embed2 = ConvPatchEmbed(p2, w2, self.dtype)
    self.patch_embed3 = ConvPatchEmbed(p3, w3, self.dtype, vit.patch_kernel_init)
    self.patch_embed4 = nn.Dense(w3, dtype=self.dtype, kernel_init=vit.dense_init)
    self.embed_drop = nn.Dropout(self.dropout)  # the reference's pos_drop, after patch_embed1
    self.cls = self.param('cls_token', vit.token_init, (1, 1, w3)) if self.cls_token else None
    if self.posemb == 'learned':
      self.pos_embed = self.param('pos_embed', vit.timm_trunc_normal(0.02),
                                  (1, self.num_prefix_tokens + self.num_patches, w3))
    else:
      self.pos_embed = jnp.asarray(vit.posemb_sincos_2d(w3, self.grid_size, self.cls_token))[None]
    d1, d2, d3 = self.depths
    # One linspace of drop-path rates over the three stages; stage 3 reuses vit.Block (remat included).
    blocks = vit.make_blocks(d1 + d2 + d3, self.num_heads, self.mlp_ratio, self.drop_path_rate, self.dropout,
                             self.dtype, self.remat, self.attn_dropout, self.norm_eps)
    self.blocks1 = [CBlock(self.mlp_ratio, b.drop_path, self.dropout, self.dtype) for b in blocks[:d1]]
    self.blocks2 = [CBlock(self.mlp_ratio, b.drop_path, self.dropout, self.dtype) for b in blocks[d1:d1 + d2]]
    self.blocks3 = blocks[d1 + d2:]
    if self.fuses:
      self.stage1_output_decode = conv(w3, p2 * p3, w1, self.dtype, p2 * p3)
      self.stage2_output_decode = conv(w3, p3, w2, self.dtype, p3)
    vit.add_readout(self)

  def __call__(self, images, ids_keep: Optional[jnp.ndarray] = None, train: bool = False):
    """images (N, H, W, 3); ids_keep: optional (N, K) kept patches of the final grid (the rest masked).

    Returns `vit.ViT`'s dict, plus 'stage1', 'stage2': the conv stages' output maps (N, h, w, C); 'pre_norm' is
    the final norm's input (after the fusion).
    """
    n, prefix = images.shape[0], self.num_prefix_tokens
    tokens = lambda x: x.reshape(n, self.num_patches, x.shape[-1])
    x = self.embed_drop(self.patch_embed1(images), not train)
    out, stages = {}, []
    for s, blocks in enumerate((self.blocks1, self.blocks2)):
      if s:
        x = self.patch_embed2(x)
      visible = None if ids_keep is None else visible_map(ids_keep, self.grid_size, x.shape[1] // self.grid_size[0],
                                                          x.dtype)
      for block in blocks:
        x = block(x, visible, train)
      out[f'stage{s + 1}'] = x
      stages.append(x)
    x = self.patch_embed4(tokens(self.patch_embed3(x))) + self.pos_embed[:, prefix:].astype(self.dtype)
    out['embedded'] = x
    fused = [tokens(self.stage1_output_decode(stages[0])) + tokens(self.stage2_output_decode(stages[1]))
             ] if self.fuses else []
    if ids_keep is not None:
      x, fused = masking.gather(x, ids_keep), [masking.gather(f, ids_keep) for f in fused]
    if self.cls_token:
      cls = jnp.broadcast_to(self.cls + self.pos_embed[:, :1], (n, 1, self.width))
      x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    out['block_input'] = x
    blocks = []
    for block in self.blocks3:
      x = block(x, train)
      blocks.append(x)
    out['blocks'] = tuple(blocks)
    if fused:
      x = jnp.concatenate([x[:, :prefix], x[:, prefix:] + fused[0]], axis=1)
    out['pre_norm'] = x
    return vit.readout(self, x, out)

