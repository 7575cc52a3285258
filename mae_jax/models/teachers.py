"""Frozen feature teachers (MR-MAE, MaskAlign): OpenAI CLIP's image tower, DINO's ViT, or one of our encoders.

All three are the shared `vit.ViT` with options, so a teacher's params are an encoder's params (the same
paths as timm's keys; the importers in `mae_jax.export.teachers` read the other layouts):
  clip  ViT-B/16 image tower: class embedding, learned positions, conv1 without bias, ln_pre (`norm_pre`) over
        every token, pre-norm blocks with QuickGELU, LayerNorm eps 1e-5, ln_post (`norm`) and the bias-free
        projection (`head`, on the cls token after ln_post). Input: CLIP's mean/std.
  dino  timm's `vit_base_patch16_224` (DINO's `vit_base`): learned positions, eps 1e-6, exact GELU. ImageNet mean/std.
  vit   an encoder this project pretrained (MAE's: fixed sin-cos table), fed the student's own input.
A teacher sees the full image the student sees, at its resolution: its learned position table is resampled
(bicubic, timm's) to the student's grid when the file's differs (`adapt`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import frozen
from mae_jax.models import vit

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# arch: (ViT options, input mean, input std); None: the student's own normalisation.
ARCHS = {
    'clip': (dict(posemb='learned', patch_bias=False, pre_norm=True, norm_eps=1e-5, act='quick_gelu'),
             CLIP_MEAN, CLIP_STD),
    'dino': (dict(posemb='learned'), IMAGENET_MEAN, IMAGENET_STD),
    'vit': (dict(), None, None),
}
FEATURES = ('pre_norm', 'post_norm', 'proj')  # a layer's tokens; after the final norm; CLIP's projection of those


def module(arch, variant, img_size, proj_dim=0, mlp_ratio=4.0):
  """The teacher's ViT at the student's resolution. `variant`: 'B/16' or a dict of width, depth, num_heads,
  patch_size; `proj_dim`: CLIP's projection (512 for ViT-B/16), 0: none."""
  if arch not in ARCHS:
    raise ValueError(f'teacher arch {arch!r}: expected one of {sorted(ARCHS)}')
  dims = vit.parse_variant(variant) if isinstance(variant, str) else dict(variant)
  head = dict(pool='cls', num_classes=proj_dim, head_bias=False) if proj_dim else {}
  return vit.ViT(img_size=img_size, mlp_ratio=mlp_ratio, **dims, **ARCHS[arch][0], **head)


def input_images(images, arch, data_mean, data_std):
  """The student's images (normalised with the data's mean/std) in the teacher's own normalisation."""
  _, mean, std = ARCHS[arch]
  if mean is None:
    return images
  pixels = images * jnp.asarray(data_std, images.dtype) + jnp.asarray(data_mean, images.dtype)
  return (pixels - jnp.asarray(mean, images.dtype)) / jnp.asarray(std, images.dtype)


def hidden_states(teacher, params, images, layers, feature='pre_norm'):
  """[(N, 1 + L, D_or_proj) per entry of `layers`]: 0 is the first block's input (after CLIP's ln_pre), k the
  output of block k, -1 the last block's. `feature`: the layer's tokens as they are ('pre_norm'), after the
  final norm ('post_norm'), or that projected by CLIP's `head` ('proj', every token, as MILAN does)."""
  out = teacher.apply({'params': params}, images)
  states = (out['block_input'],) + out['blocks']
  chosen = [states[layer] for layer in layers]
  if feature == 'pre_norm':
    return chosen
  normed = [teacher.apply({'params': params}, x, method=lambda m, x: m.norm(x)) for x in chosen]
  if feature == 'post_norm':
    return normed
  return [teacher.apply({'params': params}, x, method=lambda m, x: m.head(x)) for x in normed]


def adapt(teacher):
  """A `FrozenNetwork.adapt` for `teacher`: resamples a learned table of another grid to the teacher's, and
  drops CLIP's projection when the teacher uses none (an HF `CLIPModel` or open_clip file has it)."""
  def fn(params):
    params = dict(params)
    table = params.get('pos_embed')
    want = teacher.num_prefix_tokens + teacher.num_patches
    if table is not None and np.shape(table)[1] != want:
      params['pos_embed'] = vit.resample_posemb(table, teacher.grid_size, teacher.num_prefix_tokens)
    if not teacher.num_classes:
      params.pop('head', None)
    return params
  return fn


def frozen_network(field, teacher, subtree='encoder'):
  """The `FrozenNetwork` of `teacher` whose file or run config field `field` names."""
  expected = lambda: jax.eval_shape(teacher.init, jax.random.key(0),
                                    jnp.zeros((1, teacher.img_size, teacher.img_size, 3)))['params']
  return frozen.FrozenNetwork(field, expected, subtree, adapt(teacher))
