"""MR-MAE (Gao et al., "Mimic before Reconstruct", 2023): mimic frozen teachers on the visible tokens, reconstruct
pixels on the masked ones.

What the paper states (abstract): the encoder sees the visible 25%; a mimic loss on those tokens' encoder
outputs captures CLIP's and DINO's features; MAE's decoder and pixel loss act on the masked 75%, so the two
targets never meet on one token. No code was released; the rest is `config.mr_mae`, each default argued in
docs/mr_mae.md (MaskAlign, the same group's code, is the closest lead):

  teachers     config.mr_mae.teachers.<name> (arch clip | dino | vit, a file or run in `init_from`), the ones
               in `use`; frozen, outside the train state (`frozen_networks`), each fed the full image in its own
               normalisation, at the student's resolution (`mae_jax.models.teachers`).
  targets      the teacher's tokens of `layers` (default the last block's output, before the final norm), at
               the kept ids (the cls token too with `cls`), normalised per token by `target_norm`.
  heads        one per teacher and layer on the encoder's output tokens (after its final norm): `head`.
  loss         `loss` (l2 | smooth_l1 | cosine) per layer, averaged over the layers, times `weight`; plus
               MAE's pixel loss on the masked patches unless `mimic_only` (MaskAlign: no decoder at all).

Objective 'mr_gan_mae' composes the same mimic terms with GAN-MAE's generator, discriminator and adversarial
term (config.gan_mae): mimic + adversarial + pixels.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mae_jax.config import require
from mae_jax.models import convvit, masking, teachers, vit
from mae_jax.models.patchify import patchify
from mae_jax.objectives.gan_mae import GANMAE
from mae_jax.objectives.base import Objective, PhaseTrainable
from mae_jax.objectives.mae import MAE, reconstruction_loss

sg = jax.lax.stop_gradient
HEADS = ('linear', 'norm_linear', 'mlp')
TARGET_NORMS = ('none', 'whiten', 'l2')
LOSSES = ('l2', 'smooth_l1', 'cosine')


def teacher_config(arch, proj_dim=0):
  """One entry of config.mr_mae.teachers, with the defaults docs/mr_mae.md argues."""
  return ml_collections.ConfigDict(dict(
      arch=arch,             # clip | dino | vit (an encoder of ours, fed the student's normalisation)
      variant='B/16',        # its ViT size; the patch must be the student's (the same token grid)
      proj_dim=proj_dim,     # CLIP's projection width (512 for ViT-B/16), needed by feature='proj'; 0: none
      init_from='',          # `python -m mae_jax.export import --format=clip-hf|clip-openai|clip-timm|dino` or a run
      subtree='encoder',     # the params entry of that file or run's checkpoint
      weight=1.0,            # of this teacher's mimic term
      layers=(-1,),          # 0: the first block's input, k: block k's output, -1: the last block's
      feature='pre_norm',    # pre_norm | post_norm (after the teacher's final norm) | proj (CLIP's projection)
      cls=False,             # also mimic the cls token
      head='linear',         # linear | norm_linear (LayerNorm first) | mlp (Dense-GELU-Dense)
      target_norm='whiten',  # none | whiten (LayerNorm without affine, eps 1e-5: MaskAlign's) | l2
      loss='smooth_l1',      # l2 | smooth_l1 (MaskAlign's 2 * smooth_l1, beta 1) | cosine (2 - 2 cos, MILAN's)
  ))


def normalize_targets(x, kind):
  if kind == 'whiten':
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5)
  if kind == 'l2':
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return x


def feature_loss(pred, target, kind):
  """Mean over tokens of the per-token loss."""
  pred = pred.astype(jnp.float32)
  if kind == 'l2':
    return jnp.mean((pred - target) ** 2)
  if kind == 'smooth_l1':
    d = jnp.abs(pred - target)
    return 2.0 * jnp.mean(jnp.where(d < 1.0, 0.5 * d * d, d - 0.5))
  cos = jnp.sum(normalize_targets(pred, 'l2') * normalize_targets(target, 'l2'), axis=-1)
  return jnp.mean(2.0 - 2.0 * cos)


class MimicHead(nn.Module):
  """A student head regressing one teacher layer's features from the encoder's tokens."""
  out_dim: int
  kind: str = 'linear'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.kind == 'norm_linear':
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    if self.kind == 'mlp':
      x = nn.gelu(nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=vit.dense_init)(x), approximate=False)
    return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=vit.dense_init)(x)


class Mimic:
  """The mimic terms, mixed into MAE (MR-MAE) and GAN-MAE ('mr_gan_mae'). Params: the base's, plus
  'mimic_<teacher>' ({'layer_<k>': head}); frozen: 'teacher_<teacher>'."""
  section = 'mr_mae'

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        teachers=dict(clip=teacher_config('clip', proj_dim=512), dino=teacher_config('dino')),
        use=('clip', 'dino'),  # the teachers mimicked, names in `teachers`
        mimic_only=False,      # MaskAlign: no decoder, no pixel loss
    ))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    m = config.mr_mae
    require(len(m.use) >= 1 and all(name in m.teachers for name in m.use),
            f'config.mr_mae.use={tuple(m.use)} must name at least one of config.mr_mae.teachers ({sorted(m.teachers)})')
    student = convvit.encoder_dims(config.model.variant)['patch_size']
    for name in m.use:
      t, where = m.teachers[name], f'config.mr_mae.teachers.{name}'
      require(t.arch in teachers.ARCHS, f'{where}.arch={t.arch!r} is not one of {sorted(teachers.ARCHS)}')
      try:
        dims = vit.parse_variant(t.variant)
      except ValueError as e:
        require(False, f'{where}.variant: {e}')
      require(dims['patch_size'] == student,
              f'{where}.variant={t.variant!r}: its patch {dims["patch_size"]} is not the student\'s {student}; the '
              'targets are taken token by token, so the two grids must be the same')
      require(all(-dims['depth'] - 1 <= k <= dims['depth'] for k in t.layers) and len(t.layers) >= 1,
              f'{where}.layers={tuple(t.layers)}: each in [-{dims["depth"] + 1}, {dims["depth"]}] (0: the input of '
              'the first block, -1: the last block)')
      require(t.feature in teachers.FEATURES, f'{where}.feature={t.feature!r} is not one of {teachers.FEATURES}')
      require(t.feature != 'proj' or t.proj_dim > 0, f"{where}.feature='proj' needs {where}.proj_dim > 0 (CLIP's)")
      require(t.head in HEADS, f'{where}.head={t.head!r} is not one of {HEADS}')
      require(t.target_norm in TARGET_NORMS, f'{where}.target_norm={t.target_norm!r} is not one of {TARGET_NORMS}')
      require(t.loss in LOSSES, f'{where}.loss={t.loss!r} is not one of {LOSSES}')
      require(t.weight >= 0, f'{where}.weight={t.weight} must be >= 0')
      require(not t.cls or not convvit.is_conv(config.model.variant) or config.model.convvit.cls_token,
              f'{where}.cls=True needs a student with a cls token: set config.model.convvit.cls_token=True')

  def __init__(self, config):
    super().__init__(config)
    m = config.mr_mae
    self.mimic_only = m.mimic_only
    self.teachers = {}
    for name in m.use:
      t = m.teachers[name]
      module = teachers.module(t.arch, t.variant, self.img_size, t.proj_dim if t.feature == 'proj' else 0)
      layers = tuple(k % (module.depth + 1) for k in t.layers)  # -1 -> depth
      out_dim = module.num_classes or module.width
      heads = {k: MimicHead(out_dim, t.head, vit.compute_dtype(config.model)) for k in layers}
      self.teachers[name] = (t, module, layers, heads)

  def frozen_networks(self):
    return {f'teacher_{name}': teachers.frozen_network(f'mr_mae.teachers.{name}.init_from', module, t.subtree)
            for name, (t, module, _, _) in self.teachers.items()}

  def frozen_forwards(self):
    return {f'teacher_{name}': lambda params, images, name=name: self.teacher_features(params, images, (name,))
            for name in self.teachers}

  def init(self, rng):
    params = super().init(rng)
    if self.mimic_only:
      del params['decoder']
    tokens = jnp.zeros((1, 1, self.encoder.width))
    for n, (name, (_, _, layers, heads)) in enumerate(self.teachers.items()):
      params[f'mimic_{name}'] = {f'layer_{k}': heads[k].init(jax.random.fold_in(rng, 100 + 10 * n + i), tokens)['params']
                                 for i, k in enumerate(layers)}
    return params

  def teacher_features(self, params, images, names=None):
    """{teacher: [(N, 1 + L, D) per layer]}: the frozen teachers' targets for every token, before the gathering
    (`names`: of these teachers only)."""
    out = {}
    for name in names or self.teachers:
      t, module, layers, _ = self.teachers[name]
      x = teachers.input_images(images, t.arch, self.config.data.mean, self.config.data.std)
      out[name] = teachers.hidden_states(module, sg(params[f'teacher_{name}']), x, layers, t.feature)
    return out

  def mimic_terms(self, params, features, latent, ids_keep):
    """{'mimic_<teacher>': weighted term} and the unweighted 'loss/mimic_<teacher>' metrics, from the encoder's
    tokens `latent` (N, [1 +] K, D) of the kept patches `ids_keep` (N, K) and `teacher_features`."""
    terms, metrics = {}, {}
    for name, (t, _, layers, heads) in self.teachers.items():
      student = latent if t.cls else latent[:, self.encoder.num_prefix_tokens:]
      losses = []
      for k, state in zip(layers, features[name]):
        target = masking.gather(state[:, 1:], ids_keep)  # the teacher's tokens at the visible patches
        if t.cls:
          target = jnp.concatenate([state[:, :1], target], axis=1)
        target = normalize_targets(sg(target).astype(jnp.float32), t.target_norm)
        pred = heads[k].apply({'params': params[f'mimic_{name}'][f'layer_{k}']}, student)
        losses.append(feature_loss(pred, target, t.loss))
      loss = sum(losses) / len(losses)
      terms[f'mimic_{name}'] = t.weight * loss
      metrics[f'loss/mimic_{name}'] = loss
    return terms, metrics

  def mimic_loss(self, params, images, latent, ids_keep):
    terms, metrics = self.mimic_terms(params, self.teacher_features(params, images), latent, ids_keep)
    return sum(terms.values()), metrics


class MRMAE(Mimic, MAE):
  """MR-MAE: MAE's encoder and decoder (no decoder params with `mimic_only`) plus a head per teacher and layer."""

  def num_fixed_params(self):
    return Objective.num_fixed_params(self) if self.mimic_only else super().num_fixed_params()

  def loss_fn(self, params, batch, rng, train=True):
    """Pixel loss (masked patches) + the weighted mimic terms (visible tokens), one encoder pass for both."""
    images = batch['image']
    latent, m = self.encode(params, images, self.sample_noise(batch['example_key']), rng, train)
    loss, metrics = self.mimic_loss(params, images, latent, m.ids_keep)
    if not self.mimic_only:
      pred = self.decode(params, latent, m.ids_restore, rng, train)
      rec = reconstruction_loss(pred, patchify(images, self.patch_size), m.mask, self.norm_pix_loss)
      loss, metrics = loss + rec, {**metrics, 'loss/reconstruction': rec}
    return loss, metrics

  def visualize(self, params, images, rng):
    return None if self.mimic_only else super().visualize(params, images, rng)


class MRGANMAE(Mimic, GANMAE):
  """GAN-MAE's players plus the mimic terms on the generator's encoder pass (mimic + adversarial + pixels).

  The mimic term encodes the visible patches again, with the generator's mask and dropout key: the same
  computation as the generator's encoder pass, which XLA computes once (common subexpressions).
  """

  @classmethod
  def validate(cls, config):
    super().validate(config)
    require(not config.mr_mae.mimic_only, "config.mr_mae.mimic_only=True has no generator for objective 'mr_gan_mae'")

  def _with_mimic(self, loss, metrics, params, batch, rng, train):
    gen_rng, _ = jax.random.split(rng)  # GAN-MAE's generator key
    latent, m = self.encode(params, batch['image'], self.sample_noise(batch['example_key']), gen_rng, train)
    mimic, mimic_metrics = self.mimic_loss(params, batch['image'], latent, m.ids_keep)
    return loss + mimic, {**metrics, **mimic_metrics}

  def loss_fn(self, params, batch, rng, train=True):
    return self._with_mimic(*super().loss_fn(params, batch, rng, train), params, batch, rng, train)

  def trainable(self, params):
    """GAN-MAE's phases, the mimic heads in the generator's (whose loss has the mimic terms)."""
    phases = super().trainable(params)
    if self.update_scheme == 'joint':
      return phases
    heads = {name: jax.tree.map(lambda _: True, params[name]) for name in params if name.startswith('mimic_')}
    return PhaseTrainable(generator={**phases['generator'], **heads}, discriminator=phases['discriminator'])

  def generator_loss(self, params, batch, rng, train=True):
    return self._with_mimic(*super().generator_loss(params, batch, rng, train), params, batch, rng, train)
