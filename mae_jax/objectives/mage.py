"""MAGE (Li et al., CVPR 2023): masked generative encoding over the ids of a frozen VQGAN; and MAGE-C.

As the reference (LTH14/mage `models_mage.py`, spec mage.md 1.2-1.6 and 7):
  tokens      the frozen tokenizer (`config.mage.tokenizer`, sizes `config.vqgan`) maps [0, 1] images to
              L = (H / 16)^2 ids; the vocabulary is codebook + 1000 + 1 (1024 + 1000 + 1: MaskGIT's class
              rows, a legacy of the JAX checkpoints), the fake class id codebook + 76 (1100) is put at
              position 0, [MASK] is the last id (2024).
  masking     one ratio r per batch from a Gaussian N(0.55, 0.25) truncated to [0.5, 1], drawn from the step's
              key; per image, by ranks of uniform noise from its example key, the ceil(0.5 L) lowest-noise
              tokens are dropped and the ceil(L r) lowest (a superset) replaced by [MASK].
  encoder     BERT-style word + learned position embedding (1 + L rows) -> LayerNorm(1e-6) -> dropout, then
              the kept tokens (the fake-class one and 1 + L - ceil(0.5 L) others, in ascending position
              order: 129 at 256 px) through ViT blocks and `norm` (`vit.ViT` with the token stem).
  decoder     `MAGEDecoder`: pads with the position-0 output, learned table, blocks, MlmLayer tied to the
              word embedding with stop-gradient (mae_jax/models/mage_decoder.py).
  loss        label-smoothed (0.1) cross-entropy over the first `codebook` logits, averaged over the masked
              tokens (dropped ones included): 0.9 NLL + 0.1 mean(-log p).
  numerics    dropout and attention dropout 0.1 (config.model.dropout, config.mage.attn_dropout,
              config.mage.embed_dropout), fp32 attention logits, exact GELU, the reference's initialisation.
  init        by default the reference's: word embedding and both learned position tables N(0, 0.02). Two
              options for short schedules on narrow models (the CPU demo; configs/mage_tiny_cpu.py says
              why): `token_init_std` scales the word embedding, and so the tied logits, whose reach is about
              std * width; `pos_init='sincos'` starts both tables from MAE's 2-D sin-cos table (still learned).

MAGE-C (the paper's contrastive variant; its code was never released, so every choice below is UNVERIFIED
and a field of `config.mage.contrastive`, documented there): two views per image drawn in the step
(`transforms.contrastive_views`), both tokenised, masked with the batch's ratio and trained on the token
loss; their encoder outputs, averaged over the kept image tokens, go through a 2-layer MLP head and a
SimCLR InfoNCE (NT-Xent over the 2N views, temperature 0.2) added with weight 0.1.
"""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mae_jax.config import is_number, require
from mae_jax.data import transforms
from mae_jax.models import convvit, masking, vit, vqgan
from mae_jax.models.mage_decoder import MAGEDecoder
from mae_jax.models.patchify import compose, patchify, unpatchify
from mae_jax.objectives.base import Objective

CLASS_ROWS = 1000  # vocabulary rows after the codebook: MaskGIT's class-conditional layout, unused by MAGE
FAKE_CLASS_OFFSET = 76  # the fake class id is codebook + 76 (1100 for 1024 codes), as the JAX checkpoints have it
TOKENIZER_FILE = 'vqgan_jax_strongaug.msgpack'  # where the paper configs look for the imported tokenizer


def vocabulary(codebook_size):
  """(vocab size, fake class id, [MASK] id) for a codebook: (2025, 1100, 2024) for 1024 codes."""
  vocab = codebook_size + CLASS_ROWS + 1
  return vocab, codebook_size + FAKE_CLASS_OFFSET, vocab - 1


def sample_mask_ratio(key, mu=0.55, std=0.25, lo=0.5, hi=1.0):
  """One mask ratio from N(mu, std) truncated to [lo, hi]: scipy.stats.truncnorm((lo - mu) / std,
  (hi - mu) / std, loc=mu, scale=std), the reference's `mask_ratio_generator`."""
  z = jax.random.truncated_normal(key, (lo - mu) / std, (hi - mu) / std, (), jnp.float32)
  return jnp.clip(mu + std * z, lo, hi)  # rounding of mu + std * z may step outside by an ulp


def num_masked_tokens(num_tokens, mask_ratio):
  """ceil(L r) as an int32 (traced) scalar: the reference's `np.ceil(seq_len * mask_rate)`."""
  return jnp.ceil(num_tokens * mask_ratio).astype(jnp.int32)


def token_masks(noise, num_dropped, num_masked):
  """Masks of `noise` (N, L): (ids_keep (N, L - num_dropped) ascending, dropped (N, L) bool, masked (N, L)
  bool). The `num_dropped` (Python int) lowest-noise tokens are dropped, the `num_masked` (traced) lowest
  masked; by ranks, so the counts are exact (the reference re-draws the noise on ties)."""
  ids_keep = jnp.sort(jnp.argsort(noise, axis=1)[:, num_dropped:], axis=1)
  return ids_keep, masking.dynamic_mask(noise, num_dropped) > 0, masking.dynamic_mask(noise, num_masked) > 0


def token_loss(logits, targets, masked, codebook_size, smoothing):
  """Mean over the masked tokens of the label-smoothed cross-entropy over the first `codebook_size` logits
  (the reference's LabelSmoothingCrossEntropy on `logits[:, 1:, :codebook_size]`)."""
  logprobs = jax.nn.log_softmax(logits[:, 1:, :codebook_size].astype(jnp.float32))
  nll = -jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  per_token = (1.0 - smoothing) * nll - smoothing * logprobs.mean(-1)
  return jnp.sum(per_token * masked) / jnp.sum(masked)


def nt_xent(z1, z2, temperature):
  """SimCLR's NT-Xent: each of the 2N views against the other 2N - 1, its pair the positive (both
  directions). Returns (loss, accuracy of the positive being the nearest)."""
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)
  n = z1.shape[0]
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, z @ z.T / temperature)
  positive = (jnp.arange(2 * n) + n) % (2 * n)
  loss = jnp.mean(jax.nn.logsumexp(logits, -1) - logits[jnp.arange(2 * n), positive])
  return loss, jnp.mean(jnp.argmax(logits, -1) == positive)


class ProjectionHead(nn.Module):
  """MAGE-C's projection of the pooled features: fc1 -> ReLU -> fc2 (SimCLR's 2-layer MLP; UNVERIFIED)."""
  hidden_dim: int
  dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden_dim, kernel_init=vit.dense_init, name='fc1')(x))
    return nn.Dense(self.dim, kernel_init=vit.dense_init, name='fc2')(x)


def pretrain_recipe(c, variant, decoder_width):
  """MAGE's pretraining recipe (main_pretrain.py, README command) on config `c`: ImageNet-1k (TFDS, with a kNN
  monitor on 100k training images), 256 px, bilinear RandomResizedCrop(0.2, 1) + flip, [0, 1] pixels (mean 0,
  std 1), batch 4096, AdamW (0.9, 0.95) with lr = 1.5e-4 * 4096 / 256, wd 0.05 (not on 1-D params: timm
  0.3.2's rule), 40 warm-up epochs and a cosine to 0 over 1600 epochs, global-norm clipping at 3.0, dropout
  0.1, an 8 x 16-head decoder of the encoder's width, MaskGIT's tokenizer imported to TOKENIZER_FILE."""
  c.objective = 'mage'
  c.model.update(variant=variant, dropout=0.1)
  c.model.decoder.update(width=decoder_width, depth=8, num_heads=16)
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation', img_size=256, crop_scale=(0.2, 1.0),
                interpolation='bilinear', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000
  c.train.update(batch_size=4096, epochs=1600, warmup_epochs=40, blr=1.5e-4, min_lr=0.0, weight_decay=0.05,
                 b1=0.9, b2=0.95, grad_clip=3.0)
  c.vqgan.update(vqgan.maskgit_config())
  c.mage.tokenizer = TOKENIZER_FILE
  return c


class MAGE(Objective):
  """Params: 'encoder' (`vit.ViT`, token stem), 'decoder' (`MAGEDecoder`), with MAGE-C 'contrastive_head';
  the frozen tokenizer reaches `loss_fn` as params['tokenizer']."""
  section = 'mage'
  image_columns = ('original', 'tokenized', 'masked', 'prediction')

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        tokenizer='',          # the frozen VQGAN (sizes: config.vqgan): an imported params file or a tokenizer run
        mask_ratio_min=0.5,    # the truncated Gaussian of the mask ratio; ceil(L * min) tokens are always dropped
        mask_ratio_max=1.0,
        mask_ratio_mu=0.55,
        mask_ratio_std=0.25,
        label_smoothing=0.1,
        attn_dropout=0.1,      # on the attention weights, encoder and decoder (the blocks' dropout: config.model)
        embed_dropout=0.1,     # after the embedding LayerNorm (BertEmbeddings' hidden dropout)
        token_init_std=0.02,   # the word embedding's init std, which also scales the tied logits (init, above)
        pos_init='normal',     # both learned position tables: 'normal' (the reference's 0.02) or 'sincos'
        contrastive=dict(      # MAGE-C; the paper's code was never released: every default here is UNVERIFIED
            weight=0.0,        # lambda of the InfoNCE term (0: plain MAGE; MAGE-C: 0.1, as we read the paper)
            temperature=0.2,
            hidden_dim=2048,   # the projection head: Dense(hidden) -> ReLU -> Dense(dim), SimCLR's shape
            dim=256,
            crop_scale=(0.5, 1.0),  # each view's crop of the loader's crop (0.2, 1): about SimCLR's (0.08, 1)
            color_jitter=0.4,  # brightness, contrast, saturation factors U(1 -+ 0.4) (MoCo v2's strength)
            color_jitter_prob=0.8,
            grayscale_prob=0.2,
        ),
    ))

  @classmethod
  def validate(cls, config):
    m, contrastive = config.mage, config.mage.contrastive
    require(0.0 <= m.mask_ratio_min < m.mask_ratio_max <= 1.0 and m.mask_ratio_std > 0,
            'config.mage: need 0 <= mask_ratio_min < mask_ratio_max <= 1 and mask_ratio_std > 0')
    require(0.0 <= m.label_smoothing < 1.0, f'config.mage.label_smoothing={m.label_smoothing} must be in [0, 1)')
    require(0.0 <= m.attn_dropout < 1.0 and 0.0 <= m.embed_dropout < 1.0,
            'config.mage.attn_dropout and embed_dropout must be in [0, 1)')
    require(is_number(m.token_init_std) and m.token_init_std > 0,
            f'config.mage.token_init_std={m.token_init_std!r} must be a number > 0')
    require(m.pos_init in ('normal', 'sincos'), f"config.mage.pos_init={m.pos_init!r}: expected 'normal' or 'sincos'")
    require(contrastive.weight >= 0 and contrastive.temperature > 0 and contrastive.hidden_dim > 0
            and contrastive.dim > 0, 'config.mage.contrastive: weight >= 0, temperature, hidden_dim, dim > 0')
    lo, hi = contrastive.crop_scale
    require(0 < lo <= hi <= 1, f'config.mage.contrastive.crop_scale={tuple(contrastive.crop_scale)}: 0 < lo <= hi <= 1')
    # MAGE's encoder reads token ids through a word embedding; ConvViT's stages convolve pixels.
    require(not convvit.is_conv(config.model.variant), f'config.model.variant={config.model.variant!r}: MAGE '
            "encodes VQGAN tokens, which a ConvViT's pixel convolutions cannot read; use a ViT variant such as 'B/16'")
    downsample = vqgan.from_config(config.vqgan).downsample
    patch = vit.parse_variant(config.model.variant)['patch_size']
    require(patch == downsample, f'config.model.variant={config.model.variant!r}: its patch size {patch} must be '
            f'the tokenizer\'s {downsample} pixels per token (config.vqgan.ch_mult)')
    require(config.data.img_size % downsample == 0,
            f'config.data.img_size={config.data.img_size} is not a multiple of the tokenizer\'s {downsample}')
    from mae_jax import checkpoint  # late: it imports orbax
    path = m.tokenizer
    require(bool(path) and (os.path.isfile(path) or os.path.isdir(checkpoint.directory(path))),
            f'config.mage.tokenizer={path!r}: no such file or tokenizer run. MAGE needs its frozen VQGAN: import the '
            'released one (vqgan_jax_strongaug.ckpt, https://drive.google.com/file/d/13S_unB87n6KKuuMdyMnyExW0G1kplTbP)'
            ' with `python -m mae_jax.export import --format=vqgan --in=vqgan_jax_strongaug.ckpt --config=<this config>'
            f' --config.objective=vqgan --out={path or TOKENIZER_FILE}` (the tokenizer of this config\'s config.vqgan'
            ' sizes), or train one (objective vqgan) and name its workdir')

  def __init__(self, config):
    super().__init__(config)
    m = config.mage
    self.mask_ratio = dict(mu=m.mask_ratio_mu, std=m.mask_ratio_std, lo=m.mask_ratio_min, hi=m.mask_ratio_max)
    self.label_smoothing = m.label_smoothing
    self.contrastive = m.contrastive
    self.tokenizer = vqgan.from_config(config.vqgan)
    self.codebook_size = config.vqgan.n_embed
    self.vocab_size, self.fake_class_id, self.mask_id = vocabulary(self.codebook_size)
    dtype = vit.compute_dtype(config.model)
    self.encoder = vit.encoder_from_config(
        config.model, self.img_size, stem='tokens', vocab_size=self.vocab_size, prefix_ids=1, cls_token=False,
        posemb='learned', norm_embeddings=True, embed_dropout=m.embed_dropout, attn_dropout=m.attn_dropout,
        token_init_std=m.token_init_std, posemb_init=m.pos_init)
    self.num_tokens = self.encoder.num_patches
    self.num_dropped = math.ceil(self.num_tokens * m.mask_ratio_min)
    dec = config.model.decoder
    self.decoder = MAGEDecoder(self.encoder.grid_size, self.vocab_size, dec.width, dec.depth, dec.num_heads,
                               config.model.mlp_ratio, config.model.dropout, m.attn_dropout, dtype,
                               vit.remat_option(config.model), m.pos_init)
    self.head = ProjectionHead(m.contrastive.hidden_dim, m.contrastive.dim) if m.contrastive.weight > 0 else None

  def frozen_networks(self):
    return {'tokenizer': vqgan.frozen_network('mage.tokenizer', self.config.vqgan)}

  def init(self, rng):
    enc_rng, dec_rng, head_rng = jax.random.split(rng, 3)
    ids = jnp.zeros((1, 1 + self.num_tokens), jnp.int32)
    ids_keep = jnp.arange(self.num_tokens - self.num_dropped)[None]
    enc = self.encoder.init(enc_rng, ids, ids_keep)['params']
    latent = jnp.zeros((1, 1 + ids_keep.shape[1], self.encoder.width))
    kept = jnp.arange(1 + self.num_tokens)[None] <= ids_keep.shape[1]
    dec = self.decoder.init(dec_rng, latent, kept, ~kept, enc['token_embed']['embedding'])['params']
    params = {'encoder': enc, 'decoder': dec}
    if self.head is not None:
      params['contrastive_head'] = self.head.init(head_rng, jnp.zeros((1, self.encoder.width)))['params']
    return params

  # --- the tokenizer ---

  def pixels(self, images):
    """The [0, 1] pixels of `config.data`-normalised images (the identity for MAGE's mean 0, std 1)."""
    d = self.config.data
    return images * jnp.asarray(d.std, jnp.float32) + jnp.asarray(d.mean, jnp.float32)

  def tokenize(self, tokenizer_params, pixels):
    """[0, 1] images (N, H, W, 3) -> VQGAN ids (N, L), without gradient."""
    ids = self.tokenizer.apply({'params': tokenizer_params}, pixels, method=vqgan.VQGAN.encode)
    return jax.lax.stop_gradient(ids)

  def decode_pixels(self, tokenizer_params, ids):
    """Ids (N, L) -> [0, 1] images (N, H, W, 3), the VQGAN's decoding of the exact codebook rows."""
    return self.tokenizer.apply({'params': tokenizer_params}, ids, method=vqgan.VQGAN.decode)

  def detokenize(self, tokenizer_params, ids):
    """Ids (N, L) -> config.data-normalised images, the VQGAN's decoding."""
    images = self.decode_pixels(tokenizer_params, ids)
    d = self.config.data
    return (images - jnp.asarray(d.mean, jnp.float32)) / jnp.asarray(d.std, jnp.float32)

  # --- the model ---

  def with_fake_class(self, ids):
    return jnp.concatenate([jnp.full((ids.shape[0], 1), self.fake_class_id, ids.dtype), ids], axis=1)

  def mask_ratio_draw(self, key):
    return sample_mask_ratio(key, **self.mask_ratio)

  def forward(self, params, ids, noise, mask_ratio, rng=None, train=False):
    """The reference's forward on token ids (N, L), without the loss.

    Returns {'logits' (N, 1 + L, vocab) fp32, 'masked' (N, L) bool, 'dropped' (N, L) bool, 'latent' (N, K, D)
    the encoder's output at the kept positions (the fake-class token first)}.
    """
    ids_keep, dropped, masked = token_masks(noise, self.num_dropped, num_masked_tokens(ids.shape[1], mask_ratio))
    latent, logits = self.predict(params, jnp.where(masked, self.mask_id, ids), masked, ids_keep, dropped, train,
                                  rng)
    return {'logits': logits, 'masked': masked, 'dropped': dropped, 'latent': latent}

  def predict(self, params, tokens, masked, ids_keep=None, dropped=None, train=False, rng=None):
    """The encoder and decoder over `tokens` (N, L) ([MASK] at `masked`), the fake-class token put first; the
    encoder sees the positions `ids_keep` (N, K) of `tokens` (every one when None; the fake class always, in
    front), the decoder pads the `dropped` (N, L) ones. Returns (latent (N, K, D), logits (N, 1 + L, vocab) fp32)."""
    rngs = {'dropout': rng} if rng is not None else {}
    dropped = jnp.zeros_like(masked) if dropped is None else dropped
    latent = self.encoder.apply({'params': params['encoder']}, self.with_fake_class(tokens), ids_keep, train,
                                rngs=rngs)['tokens']
    never = jnp.zeros((tokens.shape[0], 1), bool)  # position 0 is always kept, never masked
    logits = self.decoder.apply({'params': params['decoder']}, latent, jnp.concatenate([~never, ~dropped], 1),
                                jnp.concatenate([never, masked], 1), params['encoder']['token_embed']['embedding'],
                                train, rngs=rngs)
    return latent, logits

  def loss_fn(self, params, batch, rng, train=True):
    ratio_rng, rng = jax.random.split(rng)
    ratio = self.mask_ratio_draw(ratio_rng)
    keys, pixels = batch['example_key'], self.pixels(batch['image'])
    contrastive = self.head is not None
    if contrastive:  # both views through one forward: the batch's ratio, each view its own noise
      pixels = jnp.concatenate(transforms.contrastive_views(keys, pixels, self.contrastive))
      keys = jnp.concatenate([jax.vmap(lambda k, i=i: jax.random.key_data(
          jax.random.fold_in(jax.random.wrap_key_data(k), i)))(keys) for i in (0, 1)])
    ids = self.tokenize(params['tokenizer'], pixels)
    out = self.forward(params, ids, masking.example_noise(keys, self.num_tokens), ratio, rng, train)
    loss = token_loss(out['logits'], ids, out['masked'], self.codebook_size, self.label_smoothing)
    predicted = jnp.argmax(out['logits'][:, 1:, :self.codebook_size], -1)
    metrics = {'loss/tokens': loss, 'mage/mask_ratio': ratio,
               'mage/masked_accuracy': jnp.sum((predicted == ids) * out['masked']) / jnp.sum(out['masked'])}
    if contrastive:
      z = self.head.apply({'params': params['contrastive_head']}, out['latent'][:, 1:].mean(axis=1))
      con, accuracy = nt_xent(*jnp.split(z, 2), self.contrastive.temperature)
      loss = loss + self.contrastive.weight * con
      metrics.update({'loss/contrastive': con, 'mage/contrastive_accuracy': accuracy})
    return loss, metrics

  def features(self, params, images):
    """(N, D) the encoder's output over every token of the unmasked images, averaged over the image tokens."""
    ids = self.with_fake_class(self.tokenize(params['tokenizer'], self.pixels(images)))
    return self.encoder.apply({'params': params['encoder']}, ids)['tokens'][:, 1:].mean(axis=1)

  def visualize(self, params, images, rng):
    """Original | tokenized (the VQGAN round trip) | masked (the original, masked tokens' pixels blanked) |
    prediction (the VQGAN decoding of the input tokens with the argmax prediction at the masked ones)."""
    ratio_rng, noise_rng = jax.random.split(rng)
    ids = self.tokenize(params['tokenizer'], self.pixels(images))
    out = self.forward(params, ids, jax.random.uniform(noise_rng, ids.shape), self.mask_ratio_draw(ratio_rng))
    predicted = jnp.where(out['masked'], jnp.argmax(out['logits'][:, 1:, :self.codebook_size], -1), ids)
    patch, grid = self.encoder.patch_size, self.encoder.grid_size
    target = patchify(images, patch)
    masked = unpatchify(compose(target, jnp.zeros_like(target), out['masked'].astype(jnp.float32)), patch, grid)
    return {'original': images, 'tokenized': self.detokenize(params['tokenizer'], ids), 'masked': masked,
            'prediction': self.detokenize(params['tokenizer'], predicted)}

  def unused_reference_tensors(self):
    """The reference's state_dict entries that MAGE never uses (spec 1.4: its sin-cos tables, cls and mask
    tokens, patch embedding, pixel head, and BertEmbeddings' position_ids buffer), as 'mage-official' export
    writes them so that its strict `load_state_dict` succeeds: the deterministic ones as the reference
    initialises them, the random ones zero. Import drops them. Keyed by the jax paths of the table's rules."""
    width, dec_width, patch = self.encoder.width, self.decoder.width, self.encoder.patch_size
    grid = self.encoder.grid_size
    return {
        'encoder/cls_token': np.zeros((1, 1, width), np.float32),
        'encoder/sincos_pos_embed': vit.posemb_sincos_2d(width, grid)[None],
        'encoder/patch_embed/proj/kernel': np.zeros((width, 3, patch, patch), np.float32),
        'encoder/patch_embed/proj/bias': np.zeros((width,), np.float32),
        'encoder/position_ids': np.arange(1 + self.num_tokens, dtype=np.int64)[None],
        'decoder/mask_token': np.zeros((1, 1, dec_width), np.float32),
        'decoder/decoder_pos_embed': vit.posemb_sincos_2d(dec_width, grid)[None],
        'decoder/decoder_pred/kernel': np.zeros((patch * patch * 3, dec_width), np.float32),
        'decoder/decoder_pred/bias': np.zeros((patch * patch * 3,), np.float32),
    }
