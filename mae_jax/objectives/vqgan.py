"""Training a VQGAN tokenizer (MaskGIT's architecture, `mae_jax.models.vqgan`): MAGE's missing piece.

MAGE's tokenizer was trained in JAX with code that was never released (spec mage.md 1.1, issue #46); this is
our recipe, every choice a field of `config.vqgan`:

  reconstruction  l1_weight * mean |x - x^| + l2_weight * mean (x - x^)^2 on [0, 1] pixels.
  quantiser       VQ-VAE's losses: codebook_weight * (|sg(z) - e|^2 + beta |z - sg(e)|^2), beta 0.25 on the
                  commitment term (MaskGIT's quantiser; taming's `legacy=True` puts beta on the other term).
                  The decoder sees the straight-through codes z + sg(e - z). With `ema`, the codebook is not a
                  param: it follows taming's `EMAVectorQuantizer` (decayed counts and sums, Laplace-smoothed)
                  in the mutable collection 'ema', and only the commitment term remains.
  adversarial     with adv_weight > 0: a PatchGAN discriminator (taming's NLayerDiscriminator without its
                  BatchNorm, as MaskGIT's StyleGAN discriminator has no normalisation), hinge or non-saturating
                  loss; the generator's term is weighted by adv_weight times taming's
                  `calculate_adaptive_weight` (||dL_rec/dW|| / (||dL_adv/dW|| + 1e-4) at the decoder's conv_out
                  kernel, clamped to [0, adv_weight_max], detached) or by adv_weight alone ('constant'); both
                  players' terms are zero before step `disc_start` (taming's `adopt_weight`).
  updates         'alternating': a tokenizer update then a discriminator update, each with its own AdamW
                  (taming's two optimizers; `Objective.update_phases`); 'joint': one update of both, the
                  players kept apart by stop-gradients (needed for `ema` and `disc_start`, whose state lives in
                  mutable collections, which the loop keeps for single-phase objectives only).

Left out: MaskGIT's perceptual (LPIPS) loss, R1 penalty and entropy loss (no weights, not built).
Metrics: codebook usage (the fraction of entries the batch uses) and perplexity (exp of the entropy of its ids).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.config import require
from mae_jax.models import vit
from mae_jax.models import vqgan as vqgan_model
from mae_jax.objectives.base import Objective, PhaseTrainable, UpdatePhase

ADAPTIVE_EPS = 1e-4  # taming's epsilon of the adaptive weight
sg = jax.lax.stop_gradient


class PatchDiscriminator(nn.Module):
  """pix2pix's PatchGAN as taming builds it (4x4 convolutions, LeakyReLU 0.2, `layers` stride-2 stages, then
  two stride-1 ones), without normalisation: one logit per overlapping patch (N, h, w), fp32."""
  ch: int = 64
  layers: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = images * 2.0 - 1.0  # taming's discriminator sees [-1, 1] images
    pad = ((1, 1), (1, 1))
    for n in range(self.layers + 1):
      x = nn.Conv(self.ch * min(2**n, 8), (4, 4), strides=2 if n < self.layers else 1, padding=pad,
                  dtype=self.dtype, name=f'conv_{n}')(x)
      x = nn.leaky_relu(x, 0.2)
    logits = nn.Conv(1, (4, 4), padding=pad, dtype=self.dtype, name=f'conv_{self.layers + 1}')(x)
    return logits[..., 0].astype(jnp.float32)


def codebook_usage(ids, n_embed):
  """{'codebook/usage': fraction of the entries used by `ids`, 'codebook/perplexity': exp(entropy of their
  frequencies)} (n_embed when all are used equally, 1 for a single one)."""
  counts = jnp.bincount(ids.reshape(-1), length=n_embed).astype(jnp.float32)
  p = counts / counts.sum()
  entropy = -jnp.sum(jax.scipy.special.xlogy(p, p))
  return {'codebook/usage': jnp.mean(counts > 0), 'codebook/perplexity': jnp.exp(entropy)}


def ema_update(state, z, ids, decay, eps):
  """taming's EMAVectorQuantizer step: decayed counts and sums of the codes z assigned to each entry, and the
  codebook = sums / Laplace-smoothed counts."""
  flat_z, flat_ids = z.reshape(-1, z.shape[-1]), ids.reshape(-1)
  n_embed = state['cluster_size'].shape[0]
  counts = jnp.bincount(flat_ids, length=n_embed).astype(jnp.float32)
  sums = jax.ops.segment_sum(flat_z, flat_ids, num_segments=n_embed)
  cluster_size = decay * state['cluster_size'] + (1 - decay) * counts
  embed_avg = decay * state['embed_avg'] + (1 - decay) * sums
  total = cluster_size.sum()
  smoothed = (cluster_size + eps) / (total + n_embed * eps) * total
  return {'codebook': embed_avg / smoothed[:, None], 'cluster_size': cluster_size, 'embed_avg': embed_avg}


def discriminator_loss(logits_real, logits_fake, kind):
  if kind == 'hinge':
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_adversarial_loss(logits_fake, kind):
  """hinge: taming's -mean D(x^); non_saturating: -log sigmoid D(x^)."""
  return -jnp.mean(logits_fake) if kind == 'hinge' else jnp.mean(jax.nn.softplus(-logits_fake))


class VQGANTokenizer(Objective):
  """Params: 'vqgan' (encoder, decoder and, without `ema`, quantize) and, with adv_weight > 0, 'discriminator'."""
  section = 'vqgan'
  image_columns = ('original', 'reconstruction')

  @staticmethod
  def default_config():
    c = vqgan_model.maskgit_config()  # the architecture (MaskGIT's), then the losses
    c.update(dict(
        l1_weight=0.0,              # mean |x - x^|
        l2_weight=1.0,              # mean (x - x^)^2
        codebook_weight=1.0,        # on the quantiser's loss, as taming's
        beta=0.25,                  # commitment cost
        ema=False,                  # codebook by EMA (mutable collection) instead of gradients
        ema_decay=0.99,
        ema_eps=1e-5,               # Laplace smoothing of the EMA counts
        adv_weight=0.0,             # 0: no adversarial term and no discriminator
        adv_weight_mode='adaptive',  # adaptive: times taming's gradient-norm ratio at conv_out | constant
        adv_weight_max=1e4,         # clamp of the adaptive ratio (taming's)
        disc_loss='hinge',          # hinge | non_saturating
        disc_start=0,               # both players' terms are off before this step
        disc_ch=64,                 # PatchGAN width and stride-2 stages (taming's ndf, n_layers)
        disc_layers=3,
        update_scheme='alternating',  # alternating: tokenizer step, then discriminator step | joint: one step
    ))
    return c

  @classmethod
  def validate(cls, config):
    v = config.vqgan
    require(tuple(config.data.mean) == (0, 0, 0) and tuple(config.data.std) == (1, 1, 1),
            'the VQGAN tokenizer takes [0, 1] pixels: set config.data.mean=(0, 0, 0) and config.data.std=(1, 1, 1) '
            f'(they are {tuple(config.data.mean)} and {tuple(config.data.std)})')
    levels = len(v.ch_mult)
    require(levels >= 1 and v.ch > 0 and v.num_res_blocks >= 1 and v.embed_dim > 0 and v.n_embed > 1,
            'config.vqgan: ch_mult non-empty, ch > 0, num_res_blocks >= 1, embed_dim > 0, n_embed > 1')
    require(levels <= vqgan_model.MAX_LEVELS, f'config.vqgan.ch_mult: at most {vqgan_model.MAX_LEVELS} levels')
    require(all(v.ch * m % v.num_groups == 0 for m in v.ch_mult),
            f'config.vqgan.num_groups={v.num_groups} must divide every level width ch * ch_mult '
            f'({[v.ch * m for m in v.ch_mult]})')
    factor = 2 ** (levels - 1)
    require(config.data.img_size % factor == 0,
            f'config.data.img_size={config.data.img_size} must be a multiple of 2^(len(ch_mult) - 1) = {factor}')
    require(min(v.l1_weight, v.l2_weight, v.codebook_weight, v.beta, v.adv_weight) >= 0
            and v.l1_weight + v.l2_weight > 0,
            'config.vqgan: loss weights >= 0, and l1_weight + l2_weight > 0')
    require(0 < v.ema_decay < 1 and v.ema_eps > 0, 'config.vqgan: ema_decay in (0, 1), ema_eps > 0')
    require(v.adv_weight_mode in ('adaptive', 'constant'),
            f"config.vqgan.adv_weight_mode={v.adv_weight_mode!r} is not 'adaptive' or 'constant'")
    require(v.disc_loss in ('hinge', 'non_saturating'),
            f"config.vqgan.disc_loss={v.disc_loss!r} is not 'hinge' or 'non_saturating'")
    require(v.update_scheme in ('alternating', 'joint'),
            f"config.vqgan.update_scheme={v.update_scheme!r} is not 'alternating' or 'joint'")
    require(v.disc_start >= 0 and v.adv_weight_max > 0 and v.disc_ch > 0 and v.disc_layers >= 1,
            'config.vqgan: disc_start >= 0, adv_weight_max > 0, disc_ch > 0, disc_layers >= 1')
    if v.adv_weight > 0:
      require(config.data.img_size // 2**v.disc_layers >= 3,
              f'config.vqgan.disc_layers={v.disc_layers} halves {config.data.img_size} px below 3 px')
      require(v.update_scheme == 'joint' or not (v.ema or v.disc_start),
              "config.vqgan.update_scheme='alternating' keeps no state between its two updates: ema and "
              "disc_start > 0 need --config.vqgan.update_scheme=joint")

  def __init__(self, config):
    super().__init__(config)
    v = config.vqgan
    dtype = vit.compute_dtype(config.model)
    self.vqgan = vqgan_model.from_config(v, dtype)
    self.n_embed = v.n_embed
    self.l1_weight, self.l2_weight = v.l1_weight, v.l2_weight
    self.codebook_weight, self.beta = v.codebook_weight, v.beta
    self.ema, self.ema_decay, self.ema_eps = v.ema, v.ema_decay, v.ema_eps
    self.adversarial = v.adv_weight > 0
    self.adv_weight, self.adv_weight_max = v.adv_weight, v.adv_weight_max
    self.adaptive = v.adv_weight_mode == 'adaptive'
    self.disc_kind, self.disc_start = v.disc_loss, v.disc_start
    self.alternating = self.adversarial and v.update_scheme == 'alternating'
    self.counts_steps = self.adversarial and v.disc_start > 0
    self.grad_accum_steps = config.train.grad_accum_steps
    self.discriminator = PatchDiscriminator(v.disc_ch, v.disc_layers, dtype) if self.adversarial else None

  # --- params and state ------------------------------------------------------------------------------

  def init(self, rng):
    vq = self.vqgan.init(rng, self.dummy_images())['params']
    if self.ema:  # the codebook lives in the 'ema' collection
      vq = {name: tree for name, tree in vq.items() if name != 'quantize'}
    params = {'vqgan': vq}
    if self.adversarial:
      params['discriminator'] = self.discriminator.init(jax.random.fold_in(rng, 1), self.dummy_images())['params']
    return params

  def init_collections(self, rng):
    out = {}
    if self.ema:
      codebook = vqgan_model.Codebook(self.n_embed, self.vqgan.embed_dim).init(rng)['params']['embedding']
      out['ema'] = {'codebook': codebook, 'cluster_size': jnp.zeros((self.n_embed,)), 'embed_avg': codebook}
    if self.counts_steps:  # micro-batches trained on: the delayed start's clock
      out['progress'] = {'micro_steps': jnp.zeros((), jnp.int32)}
    return out

  def num_fixed_params(self):
    return 0

  def tokenizer_params(self, params, collections=None):
    """The VQGAN module's params, with the EMA codebook put in place (`collections`: the run's, or those that
    `Trainer.with_frozen` adds to `params`)."""
    if not self.ema:
      return params['vqgan']
    collections = params['collections'] if collections is None else collections
    return {**params['vqgan'], 'quantize': {'embedding': collections['ema']['codebook']}}

  def forward(self, vq_params, images):
    return self.vqgan.apply({'params': vq_params}, images)

  # --- loss terms ------------------------------------------------------------------------------------

  def reconstruction_loss(self, images, reconstruction):
    diff = reconstruction - images
    return self.l1_weight * jnp.mean(jnp.abs(diff)) + self.l2_weight * jnp.mean(diff**2)

  def discriminate(self, disc_params, images):
    return self.discriminator.apply({'params': disc_params}, images)

  def adversarial_weight(self, vq_params, images, out, adv_grad):
    """adv_weight, or times taming's ||dL_rec/dW|| / (||dL_adv/dW|| + 1e-4) at W = the decoder's conv_out kernel,
    from the conv_out input and the two losses' gradients at the reconstruction (no pass through the decoder)."""
    if not self.adaptive:
      return jnp.asarray(self.adv_weight, jnp.float32)
    rec_grad = jax.grad(lambda r: self.reconstruction_loss(images, r))(sg(out['reconstruction']))
    conv_out = sg(vq_params['decoder']['conv_out'])
    conv = nn.Conv(conv_out['kernel'].shape[-1], conv_out['kernel'].shape[:2], dtype=self.vqgan.dtype)
    _, kernel_vjp = jax.vjp(lambda k: conv.apply({'params': {**conv_out, 'kernel': k}}, sg(out['hidden'])).astype(
        jnp.float32), conv_out['kernel'])
    norm = lambda g: jnp.linalg.norm(kernel_vjp(g)[0].astype(jnp.float32))
    ratio = norm(rec_grad) / (norm(adv_grad) + ADAPTIVE_EPS)
    return sg(self.adv_weight * jnp.clip(ratio, 0.0, self.adv_weight_max))

  def tokenizer_terms(self, vq_params, disc_params, images, active):
    """The tokenizer's weighted terms, metrics and the forward's outputs. `active`: 1.0 from disc_start on."""
    out = self.forward(vq_params, images)
    diff = out['reconstruction'] - images
    commitment = jnp.mean((out['z'] - sg(out['z_q'])) ** 2)
    codebook = 0.0 if self.ema else jnp.mean((sg(out['z']) - out['z_q']) ** 2)
    terms = {'reconstruction': self.reconstruction_loss(images, out['reconstruction']),
             'quantizer': self.codebook_weight * (codebook + self.beta * commitment)}
    metrics = {'loss/l1': jnp.mean(jnp.abs(diff)), 'loss/l2': jnp.mean(diff**2), 'loss/commitment': commitment,
               **codebook_usage(out['ids'], self.n_embed)}
    if not self.ema:
      metrics['loss/codebook'] = codebook
    if self.adversarial:
      # One pass through the frozen discriminator gives both the term and its gradient at the reconstruction;
      # the surrogate (zero in value) routes that gradient into the tokenizer only.
      recon = out['reconstruction']
      adv, vjp = jax.vjp(lambda r: generator_adversarial_loss(self.discriminate(sg(disc_params), r), self.disc_kind),
                         sg(recon))
      (adv_grad,) = vjp(jnp.ones_like(adv))
      weight = self.adversarial_weight(vq_params, images, out, adv_grad)
      terms['adversarial'] = active * weight * (adv + jnp.vdot(adv_grad, recon - sg(recon)))
      metrics.update({'loss/adversarial': adv, 'gan/adv_weight': weight, 'gan/active': active})
    return terms, metrics, out

  def discriminator_terms(self, disc_params, images, reconstruction, active):
    """The discriminator's weighted term and metrics; the reconstruction is stop-gradient."""
    real, fake = self.discriminate(disc_params, images), self.discriminate(disc_params, sg(reconstruction))
    loss = discriminator_loss(real, fake, self.disc_kind)
    return {'discriminator': active * loss}, {'loss/discriminator': loss, 'gan/logits_real': real.mean(),
                                              'gan/logits_fake': fake.mean(),
                                              'gan/disc_acc': 0.5 * (jnp.mean(real > 0) + jnp.mean(fake < 0))}

  # --- the seam to the train loop ----------------------------------------------------------------------

  def loss_with_collections(self, params, collections, batch, rng, train=True):
    """The joint objective (every term, one update) and the collections after it: the EMA codebook moved to
    this batch's codes, the step clock advanced (both only when training)."""
    del rng  # nothing is random
    images = batch['image']
    active = jnp.float32(1.0)
    if self.counts_steps:
      step = collections['progress']['micro_steps'] // self.grad_accum_steps
      active = (step >= self.disc_start).astype(jnp.float32)
    disc_params = params.get('discriminator')
    terms, metrics, out = self.tokenizer_terms(self.tokenizer_params(params, collections), disc_params, images, active)
    if self.adversarial:
      d_terms, d_metrics = self.discriminator_terms(disc_params, images, out['reconstruction'], active)
      terms, metrics = {**terms, **d_terms}, {**metrics, **d_metrics}
    if train and collections:
      collections = dict(collections)
      if self.ema:
        collections['ema'] = ema_update(collections['ema'], sg(out['z']), out['ids'], self.ema_decay, self.ema_eps)
      if self.counts_steps:
        collections['progress'] = {'micro_steps': collections['progress']['micro_steps'] + 1}
    return sum(terms.values()), metrics, collections

  def loss_fn(self, params, batch, rng, train=True):
    """The joint objective at `params` (which carry 'collections' when the run has some, as
    `Trainer.with_frozen` gives them); nothing is updated."""
    loss, metrics, _ = self.loss_with_collections(params, params.get('collections', {}), batch, rng, train=False)
    return loss, metrics

  def tokenizer_loss(self, params, batch, rng, train=True):
    """The 'alternating' scheme's first update: the tokenizer's terms against the current discriminator."""
    del rng, train
    terms, metrics, _ = self.tokenizer_terms(params['vqgan'], params['discriminator'], batch['image'], 1.0)
    return sum(terms.values()), metrics

  def discriminator_update_loss(self, params, batch, rng, train=True):
    """The 'alternating' scheme's second update: the discriminator on the reconstructions of the updated tokenizer."""
    del rng, train
    reconstruction = sg(self.forward(params['vqgan'], batch['image'])['reconstruction'])
    terms, metrics = self.discriminator_terms(params['discriminator'], batch['image'], reconstruction, 1.0)
    return sum(terms.values()), metrics

  def update_phases(self):
    if not self.alternating:
      return super().update_phases()
    return (UpdatePhase('vqgan', self.tokenizer_loss), UpdatePhase('discriminator', self.discriminator_update_loss))

  def trainable(self, params):
    if not self.alternating:
      return super().trainable(params)
    owns = lambda name: {group: jax.tree.map(lambda _, g=group == name: g, tree) for group, tree in params.items()}
    return PhaseTrainable(vqgan=owns('vqgan'), discriminator=owns('discriminator'))

  # --- evaluation --------------------------------------------------------------------------------------

  def reconstruct(self, params, images):
    """(decode(encode(images)) (N, H, W, 3), ids (N, h * w)), for the reconstruction evaluator."""
    out = self.forward(self.tokenizer_params(params), images)
    return out['reconstruction'], out['ids'].reshape(images.shape[0], -1)

  def features(self, params, images):
    """(N, embed_dim): the encoder's continuous codes averaged over the grid, for the kNN monitor."""
    z = self.vqgan.apply({'params': self.tokenizer_params(params)}, images, method=vqgan_model.VQGAN.encode_latents)
    return z.mean(axis=(1, 2))

  def visualize(self, params, images, rng):
    del rng
    return {'original': images, 'reconstruction': self.reconstruct(params, images)[0]}
