"""MAE (He et al., CVPR 2022): reconstruct the pixels of randomly masked patches.

The encoder sees only the visible 25% of patches; the lightweight decoder fills the rest with a mask
token and predicts every patch; the loss is the mean squared error on the masked patches, optionally
against per-patch normalised pixels (`norm_pix_loss`, unbiased variance as in the reference).
"""
import jax
import jax.numpy as jnp
import ml_collections

from mae_jax.config import require
from mae_jax.models import convvit, masking, vit
from mae_jax.models.decoder import MAEDecoder
from mae_jax.models.patchify import compose, normalize_patches, patchify, unpatchify
from mae_jax.objectives.base import Objective


def reconstruction_loss(pred, target, mask, norm_pix_loss):
  """Mean over masked patches of the per-patch mean squared error (MAE's `forward_loss`)."""
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAE(Objective):
  section = 'mae'
  image_columns = ('original', 'masked', 'reconstruction')

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        mask_ratio=0.75,     # fraction of patches removed; the encoder sees int(L * (1 - ratio)) of them
        norm_pix_loss=True,  # per-patch normalised pixel targets (the paper's best; unbiased variance)
    ))

  @classmethod
  def validate(cls, config):
    ratio = config.mae.mask_ratio
    require(0.0 < ratio < 1.0, f'config.mae.mask_ratio={ratio} must be in (0, 1)')
    patches = (config.data.img_size // convvit.encoder_dims(config.model.variant)['patch_size']) ** 2
    require(masking.num_kept(patches, ratio) >= 1,
            f'config.mae.mask_ratio={ratio} leaves no visible patch of the {patches} (int({patches} * (1 - ratio)) = 0)')

  def __init__(self, config):
    super().__init__(config)
    self.mask_ratio = config.mae.mask_ratio
    self.norm_pix_loss = config.mae.norm_pix_loss
    self.encoder = vit.encoder_from_config(config.model, self.img_size)
    self.patch_size = self.encoder.patch_size
    dec = config.model.decoder
    self.decoder = MAEDecoder(self.encoder.grid_size, out_dim=self.patch_size**2 * 3, width=dec.width,
                              depth=dec.depth, num_heads=dec.num_heads, mlp_ratio=config.model.mlp_ratio,
                              dtype=vit.compute_dtype(config.model), remat=vit.remat_option(config.model),
                              cls_token=self.encoder.num_prefix_tokens > 0)

  def init(self, rng):
    enc_rng, dec_rng = jax.random.split(rng)
    images = self.dummy_images()
    m = self.random_masking(jnp.zeros((1, self.encoder.num_patches)))
    enc_vars = self.encoder.init(enc_rng, images, m.ids_keep)
    latent = self.encoder.apply(enc_vars, images, m.ids_keep)['tokens']
    dec_vars = self.decoder.init(dec_rng, latent, m.ids_restore)
    return {'encoder': enc_vars['params'], 'decoder': dec_vars['params']}

  def num_fixed_params(self):
    return super().num_fixed_params() + (self.encoder.num_patches + self.decoder.cls_token) * self.decoder.width

  # The benchmark's baseline for the MAE paper's Table 2 (`mae_jax.bench --asymmetry`): the encoder runs on every
  # patch, in shuffled order, while the decoder and the loss keep the mask. Compute only: it leaks the targets.
  encode_every_patch = False

  def random_masking(self, noise):
    """MAE's mask of `noise` (N, L): `masking.Masking` keeping int(L * (1 - mask_ratio)) tokens."""
    m = masking.random_masking(noise, masking.num_kept(noise.shape[1], self.mask_ratio))
    return m._replace(ids_keep=jnp.argsort(noise, axis=1)) if self.encode_every_patch else m

  def sample_noise(self, example_keys):
    return masking.example_noise(example_keys, self.encoder.num_patches)

  def encode(self, params, images, noise, rng=None, train=False):
    """The encoder on the visible patches: (its tokens (N, [1 +] K, D) after the final norm, the `masking.Masking`)."""
    rngs = {'dropout': rng} if rng is not None else {}
    m = self.random_masking(noise)
    return self.encoder.apply({'params': params['encoder']}, images, m.ids_keep, train, rngs=rngs)['tokens'], m

  def decode(self, params, latent, ids_restore, rng=None, train=False):
    """The decoder's prediction of every patch, (N, L, p*p*3)."""
    rngs = {'dropout': rng} if rng is not None else {}
    return self.decoder.apply({'params': params['decoder']}, latent, ids_restore, train, rngs=rngs)

  def forward(self, params, images, noise, rng=None, train=False):
    """The reference's `forward` without the loss: (predictions (N, L, p*p*3), mask (N, L))."""
    latent, m = self.encode(params, images, noise, rng, train)
    return self.decode(params, latent, m.ids_restore, rng, train), m.mask

  def loss_fn(self, params, batch, rng, train=True):
    images = batch['image']
    pred, mask = self.forward(params, images, self.sample_noise(batch['example_key']), rng, train)
    loss = reconstruction_loss(pred, patchify(images, self.patch_size), mask, self.norm_pix_loss)
    return loss, {'loss/reconstruction': loss}

  def visualize(self, params, images, rng):
    """Original, masked input and reconstruction (visible patches pasted back), in input space.

    With `norm_pix_loss` the predictions are de-normalised with each target patch's own mean and std,
    the usual way of showing such models' outputs.
    """
    keys = jax.random.key_data(jax.random.split(rng, images.shape[0]))
    pred, mask = self.forward(params, images, self.sample_noise(keys))
    target = patchify(images, self.patch_size)
    if self.norm_pix_loss:
      mean = target.mean(-1, keepdims=True)
      std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
      pred = pred * std + mean
    as_image = lambda p: unpatchify(p, self.patch_size, self.encoder.grid_size)
    return {'original': images, 'masked': as_image(compose(target, jnp.zeros_like(pred), mask)),
            'reconstruction': as_image(compose(target, pred, mask))}
