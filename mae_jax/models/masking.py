"""Per-sample random masking by argsort of uniform noise (MAE's `random_masking`).

The noise is an argument so tests (and the PyTorch parity check) can fix the mask; in training it is
drawn inside the jitted step from a key folded with the step number.
"""
import jax
import jax.numpy as jnp


def num_kept(num_patches, mask_ratio):
  """`int(L * (1 - ratio))`, as the reference computes it (49 of 196 at 0.75)."""
  return int(num_patches * (1 - mask_ratio))


def random_masking(tokens, noise, mask_ratio):
  """Keeps the `num_kept` tokens with the smallest noise, per sample.

  Args:
    tokens: (N, L, D).
    noise: (N, L) floats; ascending order decides which tokens are kept.
    mask_ratio: fraction of tokens removed.

  Returns:
    kept: (N, len_keep, D) tokens in shuffled order.
    mask: (N, L) with 1 where a token was removed, in the original order.
    ids_restore: (N, L) indices that undo the shuffle.
  """
  n, length, _ = tokens.shape
  len_keep = num_kept(length, mask_ratio)
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  ids_keep = ids_shuffle[:, :len_keep]
  kept = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
  mask = jnp.concatenate(
      [jnp.zeros((n, len_keep), tokens.dtype), jnp.ones((n, length - len_keep), tokens.dtype)], axis=1)
  mask = jnp.take_along_axis(mask, ids_restore, axis=1)
  return kept, mask, ids_restore


def unshuffle(kept, mask_token, ids_restore):
  """Appends mask tokens after the kept tokens and puts every token back in its original place."""
  n, length = ids_restore.shape
  fill = jnp.broadcast_to(mask_token.astype(kept.dtype), (n, length - kept.shape[1], kept.shape[-1]))
  full = jnp.concatenate([kept, fill], axis=1)
  return jnp.take_along_axis(full, ids_restore[..., None], axis=1)


def example_noise(example_keys, num_patches):
  """(N, L) uniform noise, one row per example key (raw key data, as the train step passes them)."""
  draw = lambda key: jax.random.uniform(jax.random.wrap_key_data(key), (num_patches,), jnp.float32)
  return jax.vmap(draw)(example_keys)
