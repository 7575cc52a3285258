"""GAN-MAE (Fei et al., CVPR 2023): MAE is the generator; the same ViT is a replaced-patch discriminator.

What the paper states (abstract): a generator produces the masked patches from the visible ones, a
discriminator predicts for each patch whether the generator synthesised it, the ViT backbone's
parameters are shared between the two, and they are trained adversarially. No official code exists.
The rest is our choice, made explicit in `config.gan_mae` and argued in docs/gan_mae.md:

  generator      MAE unchanged: the encoder sees the visible patches, the decoder predicts every patch;
                 L_rec = MSE on the masked patches, in input pixel space (no norm_pix_loss).
  corrupted x~   the original pixels at visible patches, the generator's predictions at masked ones.
  discriminator  the *same* encoder params over all patches of x~ (no masking), then `disc_head`, a
                 Dense(D -> 1) on each patch token (after the encoder's final norm): one logit per patch.
                 L_disc = BCE(logit, real) with real = visible, fake = generated; the generated pixels
                 are stop-gradient, so L_disc never trains the generator's decoder.
  adversarial    non-saturating: L_adv = mean over masked patches of -log D(x~). The discriminator is
                 held fixed in this term (its head always; the encoder in its discriminator role unless
                 `adv_through_disc_encoder`), so it only moves the generator, through the pixels.
  weight         lambda constant, or VQGAN's adaptive ||dL_rec/dW|| / (||dL_adv/dW|| + 1e-4) at
                 W = decoder_pred's kernel, clamped to [0, adv_weight_max], times `adv_weight`, detached.
  update         joint: one optimizer step on L_rec + lambda L_adv + w_d L_disc (the routing above keeps
                 the players apart); alternating: a generator step on L_rec + lambda L_adv, then a
                 discriminator step on w_d L_disc with the updated params, each with its own AdamW
                 (`Objective.update_phases`). The shared encoder is in both steps.

The adversarial term's gradient is taken once, with `jax.vjp` through the frozen discriminator: it gives
the adaptive weight and is pushed into the generator by a linear surrogate, so no second backward pass
through the discriminator is needed.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mae_jax.config import require
from mae_jax.models.patchify import compose, patchify, unpatchify
from mae_jax.models import vit
from mae_jax.models.vit import dense_init
from mae_jax.objectives.base import PhaseTrainable, UpdatePhase
from mae_jax.objectives.mae import MAE, reconstruction_loss

ADAPTIVE_EPS = 1e-4  # VQGAN's (and MAE_GAN_PL's) epsilon of the adaptive weight
sg = jax.lax.stop_gradient


def discriminator_loss(logits, mask, reduction='mean'):
  """BCE of per-patch logits against real = visible (mask 0), fake = generated (mask 1)."""
  per_patch = jnp.where(mask > 0, jax.nn.softplus(logits), jax.nn.softplus(-logits))
  if reduction == 'mean':
    return per_patch.mean()
  real, fake = 1.0 - mask, mask
  return 0.5 * ((per_patch * real).sum() / real.sum() + (per_patch * fake).sum() / fake.sum())


def adversarial_loss(logits, mask):
  """Non-saturating generator loss: mean over the generated patches of -log sigmoid(logit)."""
  return (jax.nn.softplus(-logits) * mask).sum() / mask.sum()


def discriminator_accuracy(logits, mask):
  real, fake = 1.0 - mask, mask
  acc_real = ((logits > 0) * real).sum() / real.sum()
  acc_fake = ((logits < 0) * fake).sum() / fake.sum()
  return {'gan/disc_acc_real': acc_real, 'gan/disc_acc_fake': acc_fake,
          'gan/disc_balanced_acc': 0.5 * (acc_real + acc_fake)}


def tree_vdot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class GANMAE(MAE):
  """MAE generator + shared-encoder replaced-patch discriminator. Params: encoder, decoder, disc_head.

  Reads config.mae (mask ratio) as well as its own section; docs/gan_mae.md gives the reason for each default.
  """
  section = 'gan_mae'
  image_columns = MAE.image_columns + ('disc_p_generated',)

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        update_scheme='alternating',  # alternating: a generator update, then a discriminator one | joint: one update
        adv_weight_mode='adaptive',  # adaptive: VQGAN's ||grad rec|| / (||grad adv|| + 1e-4) at decoder_pred | constant
        adv_weight=0.1,              # the constant weight, or the factor on the adaptive one
        adv_weight_max=1e4,          # clamp of the adaptive ratio (VQGAN's)
        disc_weight=1.0,             # weight of the discriminator's replaced-patch loss
        disc_loss='mean',            # mean: BCE over all patches | balanced: mean of the real and the fake patches' BCE
        adv_through_disc_encoder=False,  # True: the adversarial term also moves the encoder in its discriminator role
    ))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    g = config.gan_mae
    require(g.update_scheme in ('alternating', 'joint'),
            f"config.gan_mae.update_scheme={g.update_scheme!r} is not 'alternating' or 'joint'")
    require(g.adv_weight_mode in ('adaptive', 'constant'),
            f"config.gan_mae.adv_weight_mode={g.adv_weight_mode!r} is not 'adaptive' or 'constant'")
    require(g.disc_loss in ('mean', 'balanced'), f"config.gan_mae.disc_loss={g.disc_loss!r} is not 'mean' or 'balanced'")
    require(g.adv_weight >= 0 and g.adv_weight_max > 0 and g.disc_weight > 0,
            'config.gan_mae: adv_weight >= 0, adv_weight_max > 0, disc_weight > 0')
    require(not config.mae.norm_pix_loss,
            'config.mae.norm_pix_loss=True does not work with GAN-MAE: the discriminator sees generated patches next '
            'to real ones, so predictions must be in the input pixel space; set --config.mae.norm_pix_loss=False '
            '(docs/gan_mae.md)')

  def __init__(self, config):
    super().__init__(config)
    if self.norm_pix_loss:  # config.validate says so first; here for objectives built without it
      raise ValueError('GAN-MAE needs config.mae.norm_pix_loss=False (docs/gan_mae.md)')
    g = config.gan_mae
    self.update_scheme = g.update_scheme
    self.adaptive = g.adv_weight_mode == 'adaptive'
    self.adv_weight, self.adv_weight_max = g.adv_weight, g.adv_weight_max
    self.disc_weight, self.disc_reduction = g.disc_weight, g.disc_loss
    self.adv_through_disc_encoder = g.adv_through_disc_encoder
    self.disc_head = nn.Dense(1, dtype=vit.compute_dtype(config.model), kernel_init=dense_init)

  def init(self, rng):
    params = super().init(rng)  # the same encoder and decoder as MAE's from the same key
    head = self.disc_head.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 1, self.encoder.width)))
    return {**params, 'disc_head': head['params']}

  # --- the two players -------------------------------------------------------------------------------

  def generate(self, params, images, noise, rng=None, train=False, capture_last_hidden=False):
    """MAE's forward: (predictions (N, L, p*p*3), mask (N, L), decoder_pred's input (N, 1+L, D_dec) or None)."""
    if not capture_last_hidden:
      return (*self.forward(params, images, noise, rng, train), None)
    captured = []

    def capture(next_fun, args, kwargs, context):
      if context.method_name == '__call__' and context.module.name == 'decoder_pred':
        captured.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
      pred, mask = self.forward(params, images, noise, rng, train)
    assert len(captured) == 1, 'the decoder has no `decoder_pred` layer to weigh the adversarial term at'
    return pred, mask, captured[0]

  def corrupt(self, target, pred, mask):
    """The discriminator's input image: original visible patches, generated masked ones."""
    return unpatchify(compose(target, pred, mask), self.patch_size, self.encoder.grid_size)

  def discriminate(self, params, images, rng=None, train=False):
    """Per-patch logits (N, L), fp32: the shared encoder over every patch, then `disc_head`."""
    rngs = {'dropout': rng} if rng is not None else {}
    tokens = self.encoder.apply({'params': params['encoder']}, images, train=train, rngs=rngs)['tokens']
    logits = self.disc_head.apply({'params': params['disc_head']}, tokens[:, self.encoder.num_prefix_tokens:])
    return logits[..., 0].astype(jnp.float32)

  # --- loss terms ------------------------------------------------------------------------------------

  def _generated(self, params, batch, rng, train):
    images = batch['image']
    pred, mask, hidden = self.generate(params, images, self.sample_noise(batch['example_key']), rng, train,
                                       capture_last_hidden=self.adaptive)
    return pred, mask, patchify(images, self.patch_size), hidden

  def adversarial_weight(self, pred, target, mask, hidden, adv_grad_pred):
    """lambda: constant, or VQGAN's gradient-norm ratio at decoder_pred's kernel W (detached).

    With pred = h W + b, dL/dW = h^T dL/dpred over the patch tokens, so both norms come from the
    captured decoder_pred input h and the losses' gradients with respect to the predictions.
    """
    if not self.adaptive:
      return jnp.asarray(self.adv_weight, jnp.float32)
    rec_grad_pred = jax.grad(reconstruction_loss)(sg(pred), target, mask, False)
    # A cls token's prediction is dropped (zero gradient); ConvMAE's encoder has none.
    h = sg(hidden[:, int(self.decoder.cls_token):]).astype(jnp.float32)
    kernel_grad_norm = lambda g: jnp.linalg.norm(jnp.einsum('nld,nlo->do', h, g))
    ratio = kernel_grad_norm(rec_grad_pred) / (kernel_grad_norm(adv_grad_pred) + ADAPTIVE_EPS)
    return sg(self.adv_weight * jnp.clip(ratio, 0.0, self.adv_weight_max))

  def generator_terms(self, params, pred, mask, target, hidden, rng, train):
    """{'reconstruction', 'adversarial'} (weighted) and metrics. Moves encoder + decoder only."""
    rec = reconstruction_loss(pred, target, mask, False)
    head = sg(params['disc_head'])

    def adversarial(pred_, encoder):
      return adversarial_loss(self.discriminate({'encoder': encoder, 'disc_head': head},
                                                self.corrupt(target, pred_, mask), rng, train), mask)

    # One forward and one backward pass through the (frozen) discriminator, at stop-gradient inputs.
    encoder = sg(params['encoder'])
    if self.adv_through_disc_encoder:
      adv, vjp = jax.vjp(adversarial, sg(pred), encoder)
      adv_grad_pred, adv_grad_encoder = vjp(jnp.ones_like(adv))
    else:
      adv, vjp = jax.vjp(lambda pred_: adversarial(pred_, encoder), sg(pred))
      (adv_grad_pred,) = vjp(jnp.ones_like(adv))
    weight = self.adversarial_weight(pred, target, mask, hidden, adv_grad_pred)
    # Zero in value; its gradient is exactly the adversarial gradient, routed as configured.
    surrogate = jnp.vdot(adv_grad_pred, pred - sg(pred))
    if self.adv_through_disc_encoder:
      surrogate += tree_vdot(adv_grad_encoder, jax.tree.map(lambda p: p - sg(p), params['encoder']))
    terms = {'reconstruction': rec, 'adversarial': weight * (adv + surrogate)}
    return terms, {'loss/reconstruction': rec, 'loss/adversarial': adv, 'gan/adv_weight': weight}

  def discriminator_terms(self, params, pred, mask, target, rng, train):
    """{'discriminator'} (weighted) and metrics. The generated pixels are stop-gradient: moves encoder + disc_head."""
    logits = self.discriminate(params, self.corrupt(target, sg(pred), mask), rng, train)
    disc = discriminator_loss(logits, mask, self.disc_reduction)
    return {'discriminator': self.disc_weight * disc}, {'loss/discriminator': disc,
                                                        **discriminator_accuracy(logits, mask)}

  def loss_terms(self, params, batch, rng, train=True):
    """The named, weighted terms of the joint objective (their sum is `loss_fn`) and the metrics."""
    gen_rng, disc_rng = jax.random.split(rng)
    pred, mask, target, hidden = self._generated(params, batch, gen_rng, train)
    g_terms, g_metrics = self.generator_terms(params, pred, mask, target, hidden, disc_rng, train)
    d_terms, d_metrics = self.discriminator_terms(params, pred, mask, target, disc_rng, train)
    return {**g_terms, **d_terms}, {**g_metrics, **d_metrics}

  def loss_fn(self, params, batch, rng, train=True):
    """The joint objective L_rec + lambda L_adv + w_d L_disc (the 'joint' update; also the eval loss)."""
    terms, metrics = self.loss_terms(params, batch, rng, train)
    return sum(terms.values()), metrics

  def generator_loss(self, params, batch, rng, train=True):
    """The 'alternating' generator phase: L_rec + lambda L_adv."""
    gen_rng, disc_rng = jax.random.split(rng)
    pred, mask, target, hidden = self._generated(params, batch, gen_rng, train)
    terms, metrics = self.generator_terms(params, pred, mask, target, hidden, disc_rng, train)
    return sum(terms.values()), metrics

  def discriminator_loss(self, params, batch, rng, train=True):
    """The 'alternating' discriminator phase: w_d L_disc on x~ regenerated with the current params."""
    gen_rng, disc_rng = jax.random.split(rng)
    pred, mask, target, _ = self._generated(params, batch, gen_rng, train)
    terms, metrics = self.discriminator_terms(params, sg(pred), mask, target, disc_rng, train)
    return sum(terms.values()), metrics

  # --- the seam to the train loop ----------------------------------------------------------------------

  def update_phases(self):
    if self.update_scheme == 'joint':
      return super().update_phases()
    return (UpdatePhase('generator', self.generator_loss), UpdatePhase('discriminator', self.discriminator_loss))

  def trainable(self, params):
    if self.update_scheme == 'joint':
      return super().trainable(params)
    owns = lambda groups: {name: jax.tree.map(lambda _, g=name in groups: g, tree) for name, tree in params.items()}
    return PhaseTrainable(generator=owns({'encoder', 'decoder'}), discriminator=owns({'encoder', 'disc_head'}))

  def visualize(self, params, images, rng):
    """MAE's panels plus the discriminator's per-patch probability of 'generated' on the corrupted image."""
    shown = super().visualize(params, images, rng)
    keys = jax.random.key_data(jax.random.split(rng, images.shape[0]))
    pred, mask = self.forward(params, images, self.sample_noise(keys))
    target = patchify(images, self.patch_size)
    fake_prob = jax.nn.sigmoid(-self.discriminate(params, self.corrupt(target, pred, mask)))
    heat = jnp.broadcast_to(fake_prob[..., None], target.shape)
    mean, std = jnp.asarray(self.config.data.mean), jnp.asarray(self.config.data.std)
    heat = (unpatchify(heat, self.patch_size, self.encoder.grid_size) - mean) / std  # grey levels once shown
    return {**shown, 'disc_p_generated': heat}
