"""The downstream model of fine-tuning and linear probing: a pretrained ViT encoder under a linear head.

It implements the `Objective` seam, so the one loop trains it like any objective. Params:
  encoder  the shared `vit.ViT` with the task's pooling ('gap': `fc_norm` of the mean patch token, MAE's
           fine-tuning default; 'cls': the final `norm`'s cls token, MAE's linear probe) and, for
           fine-tuning, a learned position table initialised from the pretrained fixed one;
  head     Dense(D -> classes), trunc-normal init (std 2e-5 fine-tuning, 0.01 linear probe), zero bias;
  and, for the linear probe, the statistics of a BatchNorm(affine=False, eps=1e-6) in front of the head
  (the reference's `nn.Sequential(BatchNorm1d(D, affine=False, eps=1e-6), head)`) as a mutable collection.

Which params train is configuration (`config.optim`): fine-tuning trains everything with layer-wise lr
decay; the linear probe freezes the encoder (`optim.frozen`), so only the head moves.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.config import ConfigError
from mae_jax.data import mixup
from mae_jax.models import vit
from mae_jax.objectives.base import Objective


class FeatureBatchNorm(nn.Module):
  """torch's BatchNorm1d(affine=False) over (N, D): batch statistics in training (biased variance to
  normalise, the unbiased one into the running average, momentum 0.1), running statistics in evaluation.
  Under jit the batch is the global one, so the statistics do not depend on the mesh."""
  epsilon: float = 1e-6
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, train):
    dim = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (dim,))
    var = self.variable('batch_stats', 'var', jnp.ones, (dim,))
    if not train:
      return (x - mean.value) / jnp.sqrt(var.value + self.epsilon)
    batch_mean, batch_var = x.mean(0), x.var(0)
    if not self.is_initializing():
      n = x.shape[0]
      mean.value = (1 - self.momentum) * mean.value + self.momentum * batch_mean
      var.value = (1 - self.momentum) * var.value + self.momentum * batch_var * n / max(n - 1, 1)
    return (x - batch_mean) / jnp.sqrt(batch_var + self.epsilon)


def cross_entropy(logits, batch, label_smoothing):
  """Soft-target cross-entropy when the batch hook mixed the images (batch['target']), else the
  label-smoothed one (timm's LabelSmoothingCrossEntropy; plain cross-entropy with smoothing 0)."""
  if 'target' in batch:
    return mixup.soft_target_cross_entropy(logits, batch['target'])
  return mixup.label_smoothing_cross_entropy(logits, batch['label'], label_smoothing)


class Classifier(Objective):
  """A ViT encoder + linear head, for `task=finetune` and `task=linprobe` (`section`: their config)."""
  image_columns = ()

  def __init__(self, config, section, num_classes):
    super().__init__(config)
    self.section, self.num_classes = section, num_classes
    self.encoder = vit.encoder_from_config(config.model, self.img_size, posemb=section.posemb, pool=section.pool)
    self.head = nn.Dense(num_classes, kernel_init=vit.timm_trunc_normal(section.head_init_std),
                         bias_init=nn.initializers.zeros)
    self.batchnorm = FeatureBatchNorm() if section.get('batchnorm') else None

  def init(self, rng):
    enc = self.encoder.init(rng, self.dummy_images())['params']
    head = self.head.init(jax.random.fold_in(rng, 1), jnp.zeros((1, self.encoder.width)))['params']
    return {'encoder': enc, 'head': head}

  def init_collections(self, rng):
    if self.batchnorm is None:
      return {}
    return self.batchnorm.init(rng, jnp.zeros((2, self.encoder.width)), train=True)

  def logits(self, params, collections, images, rng=None, train=False):
    """(logits (N, classes) fp32, updated collections)."""
    rngs = {'dropout': rng} if rng is not None else {}
    features = self.encoder.apply({'params': params['encoder']}, images, train=train, rngs=rngs)['pooled']
    if self.batchnorm is not None:
      features, collections = self.batchnorm.apply(collections, features, train, mutable=['batch_stats'])
    return self.head.apply({'params': params['head']}, features).astype(jnp.float32), collections

  def loss_with_collections(self, params, collections, batch, rng, train=True):
    logits, collections = self.logits(params, collections, batch['image'], rng, train)
    loss = cross_entropy(logits, batch, self.section.label_smoothing if train else 0.0)
    return loss, {'loss/cross_entropy': loss}, collections

  def loss_fn(self, params, batch, rng, train=True):
    loss, metrics, _ = self.loss_with_collections(params, params.get('collections', {}), batch, rng, train)
    return loss, metrics

  def predict(self, params, images):
    """Evaluation logits; `params` may carry the mutable collections under 'collections'."""
    return self.logits(params, params.get('collections', {}), images)[0]

  def features(self, params, images):
    return self.encoder.apply({'params': params['encoder']}, images)['pooled']

  def warm_start_source(self, params, source_config):
    """The pretrained params to merge: its encoder, checked against ours, with a position table.

    A pretraining run has no `pos_embed` param (the table is fixed), so the learned one starts from the
    source's sin-cos table, computed for the source's grid and resampled to ours when they differ, as the
    reference's `interpolate_pos_embed` does with the checkpoint's table.
    """
    if 'encoder' not in params:
      raise ConfigError(f'config.init_from: the pretrained params have no encoder (they have {sorted(params)})')
    ours = jax.eval_shape(self.encoder.init, jax.random.key(0), self.dummy_images())['params']
    source = dict(params['encoder'])
    created = ('pos_embed', 'fc_norm', 'norm')  # ours to create, or the source's to leave out
    shapes = lambda tree: {jax.tree_util.keystr(p, simple=True, separator='/'): tuple(np.shape(leaf))
                           for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {k: v for k, v in shapes(ours).items() if not k.startswith(created)}
    have = shapes(source)
    problems = [f'{k}: {have.get(k, "missing")} in the pretrained encoder, {v} here' for k, v in want.items()
                if have.get(k) != v]
    if problems:
      their_depth = len({k.split('/')[0] for k in have if k.startswith('blocks_')})
      their_width = have.get('cls_token', (None,))[-1]
      raise ConfigError(f'config.init_from: the pretrained encoder does not fit config.model (variant '
                        f'{self.config.model.variant}): it is {their_width} wide with {their_depth} blocks, this '
                        f'model {self.encoder.width} wide with {self.encoder.depth}; ' + '; '.join(problems[:3])
                        + (f'; ... {len(problems) - 3} more' if len(problems) > 3 else ''))
    if self.encoder.posemb == 'learned' and 'pos_embed' not in source:
      size = source_config.data.img_size if source_config is not None else self.img_size
      grid = (size // self.encoder.patch_size,) * 2
      source['pos_embed'] = vit.posemb_sincos_2d(self.encoder.width, grid, self.encoder.cls_token)[None]
    return {'encoder': source}

