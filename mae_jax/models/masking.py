"""Per-sample random masking by argsort of uniform noise (MAE's `random_masking`, MAGE's variable ratio).

Masks are computed from the noise alone; the ViT takes the kept indices (`ids_keep`) and the decoder the
inverse permutation (`ids_restore`), so selecting tokens stays outside the block stack. The noise is an
argument so tests (and the PyTorch parity check) can fix the mask; in training it is drawn inside the
jitted step from a key folded with the step number.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  ids_keep: jax.Array  # (N, num_keep) int: the kept tokens, in shuffled (ascending noise) order
  mask: jax.Array  # (N, L) float: 1 where a token was removed, in the original order
  ids_restore: jax.Array  # (N, L) int: undoes the shuffle (`unshuffle`)


def num_kept(num_patches, mask_ratio):
  """`int(L * (1 - ratio))`, as the reference computes it (49 of 196 at 0.75)."""
  return int(num_patches * (1 - mask_ratio))


def gather(tokens, ids):
  """tokens (N, L, ...) at per-sample indices ids (N, K) -> (N, K, ...)."""
  return jnp.take_along_axis(tokens, ids.reshape(ids.shape + (1,) * (tokens.ndim - 2)), axis=1)


def random_masking(noise, num_keep):
  """Keeps the `num_keep` (a Python int) tokens of smallest noise per sample; noise (N, L) floats."""
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  # ids_restore is each token's rank in the shuffle: the first num_keep ranks are kept.
  mask = (ids_restore >= num_keep).astype(jnp.float32)
  return Masking(ids_shuffle[:, :num_keep], mask, ids_restore)


def dynamic_mask(noise, num_masked):
  """(N, L) float mask, 1 at the `num_masked` tokens of smallest noise per sample.

  `num_masked` may be a traced int scalar (MAGE draws one mask ratio per batch), so one compiled step
  serves every ratio; shapes do not depend on it, unlike `random_masking`'s.
  """
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return (ranks < num_masked).astype(jnp.float32)


def unshuffle(kept, mask_token, ids_restore):
  """Appends mask tokens after the kept tokens and puts every token back in its original place."""
  n, length = ids_restore.shape
  fill = jnp.broadcast_to(mask_token.astype(kept.dtype), (n, length - kept.shape[1], kept.shape[-1]))
  full = jnp.concatenate([kept, fill], axis=1)
  return gather(full, ids_restore)


def example_noise(example_keys, num_patches):
  """(N, L) uniform noise, one row per example key (raw key data, as the train step passes them)."""
  draw = lambda key: jax.random.uniform(jax.random.wrap_key_data(key), (num_patches,), jnp.float32)
  return jax.vmap(draw)(example_keys)
