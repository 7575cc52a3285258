"""Patch layout shared by every objective, in MAE's element order.

Images are NHWC. A patch vector is ordered (row-in-patch, col-in-patch, channel), channel fastest, and
patches are row-major: exactly `einsum('nchpwq->nhwpqc')` of the reference code, so targets and
predictions line up element for element with the PyTorch models.
"""
import jax.numpy as jnp


def patchify(images, patch_size):
  """(N, H, W, C) -> (N, H/p * W/p, p*p*C)."""
  n, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'image size {h}x{w} is not divisible by patch size {p}')
  x = images.reshape(n, h // p, p, w // p, p, c)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # n, h, w, p, q, c
  return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches, patch_size, grid_size, channels=3):
  """(N, h*w, p*p*C) -> (N, h*p, w*p, C); the inverse of `patchify`."""
  n = patches.shape[0]
  gh, gw = grid_size
  p = patch_size
  x = patches.reshape(n, gh, gw, p, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # n, h, p, w, q, c
  return x.reshape(n, gh * p, gw * p, channels)


def normalize_patches(patches, eps=1e-6):
  """Per-patch standardisation of MAE's `norm_pix_loss` target.

  Uses the unbiased variance (ddof=1) and adds eps to the variance, as torch's `Tensor.var` does in the
  reference; `jax.nn.standardize` would use the biased variance and change the loss.
  """
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def compose(target, pred, mask):
  """Patches of `target` where mask == 0 (visible) and of `pred` where mask == 1 (removed): MAE's pasted-back
  reconstruction, and GAN-MAE's corrupted image."""
  keep = (1.0 - mask)[..., None]
  return target * keep + pred * (1.0 - keep)
