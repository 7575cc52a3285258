"""The shared ViT pieces against the reference's definitions (formulas and element orders)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.models import masking, patchify, vit


def test_posemb_matches_the_analytic_formula():
  dim, grid = 16, (3, 5)
  table = vit.posemb_sincos_2d(dim, grid)
  assert table.shape == (1 + 15, dim) and table.dtype == np.float32
  assert not table[0].any()  # the cls row is zero
  quarter = dim // 4
  for i in range(grid[0]):
    for j in range(grid[1]):
      row = table[1 + i * grid[1] + j]
      for k in range(quarter):
        w = 10000.0 ** (-k / quarter)
        # [sin(col w), cos(col w), sin(row w), cos(row w)]: the column half comes first, as in the reference.
        expected = (math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w))
        got = (row[k], row[quarter + k], row[2 * quarter + k], row[3 * quarter + k])
        np.testing.assert_allclose(got, expected, atol=1e-6)


def test_patchify_matches_the_reference_element_order_and_inverts():
  images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
  p = 4
  # The reference: NCHW -> reshape (n, c, h, p, w, p) -> einsum('nchpwq->nhwpqc').
  nchw = images.transpose(0, 3, 1, 2).reshape(2, 3, 2, p, 3, p)
  expected = np.einsum('nchpwq->nhwpqc', nchw).reshape(2, 6, p * p * 3)
  patches = patchify.patchify(jnp.asarray(images), p)
  np.testing.assert_array_equal(np.asarray(patches), expected)
  np.testing.assert_array_equal(np.asarray(patchify.unpatchify(patches, p, (2, 3))), images)


def test_patchify_rejects_indivisible_sizes():
  with pytest.raises(ValueError, match='not divisible'):
    patchify.patchify(jnp.zeros((1, 10, 10, 3)), 4)


def test_normalize_patches_uses_the_unbiased_variance():
  x = np.random.default_rng(1).normal(size=(2, 5, 48)).astype(np.float32)
  out = np.asarray(patchify.normalize_patches(jnp.asarray(x)))
  expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_random_masking_keeps_the_smallest_noise_per_sample():
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.normal(size=(3, 196, 8)), jnp.float32)
  noise = jnp.asarray(rng.uniform(size=(3, 196)), jnp.float32)
  kept, mask, ids_restore = masking.random_masking(tokens, noise, 0.75)
  assert masking.num_kept(196, 0.75) == 49 and kept.shape == (3, 49, 8)
  order = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(np.asarray(kept), np.take_along_axis(np.asarray(tokens), order[:, :49, None], 1))
  expected_mask = np.ones((3, 196))
  np.put_along_axis(expected_mask, order[:, :49], 0, axis=1)
  np.testing.assert_array_equal(np.asarray(mask), expected_mask)
  # Unshuffling with a zero mask token puts every kept token back in its place and zeros elsewhere.
  restored = masking.unshuffle(kept, jnp.zeros((1, 1, 8)), ids_restore)
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(tokens) * (1 - expected_mask)[..., None])


def test_per_example_noise_does_not_depend_on_the_batch_split():
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), 6))
  whole = masking.example_noise(keys, 10)
  halves = jnp.concatenate([masking.example_noise(keys[:3], 10), masking.example_noise(keys[3:], 10)])
  np.testing.assert_array_equal(np.asarray(whole), np.asarray(halves))


@pytest.mark.parametrize('variant,expected', [('S/16', (384, 12, 6, 16)), ('H/14', (1280, 32, 16, 14))])
def test_parse_variant(variant, expected):
  v = vit.parse_variant(variant)
  assert (v['width'], v['depth'], v['num_heads'], v['patch_size']) == expected


def test_parse_variant_rejects_unknown_sizes():
  with pytest.raises(ValueError, match='unknown ViT variant'):
    vit.parse_variant('X/16')


def test_encoder_param_names_mirror_the_pytorch_layout():
  encoder = vit.ViTEncoder(img_size=16, patch_size=4, width=32, depth=2, num_heads=2)
  params = encoder.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert set(params) == {'patch_embed', 'cls_token', 'blocks_0', 'blocks_1', 'norm'}
  assert set(params['blocks_0']) == {'norm1', 'attn', 'norm2', 'mlp'}
  assert params['blocks_0']['attn']['qkv']['kernel'].shape == (32, 96)
  assert params['patch_embed']['proj']['kernel'].shape == (4, 4, 3, 32)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  f32 = vit.ViTEncoder(img_size=16, patch_size=4, width=32, depth=2, num_heads=2)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = f32.init(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out32, out16 = f32.apply(params, images)[0], bf16.apply(params, images)[0]
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=0.1)


def test_remat_does_not_change_outputs_or_gradients():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = vit.ViTEncoder(img_size=16, patch_size=4, width=32, depth=2, num_heads=2)
  remat = plain.clone(remat=True)
  params = plain.init(jax.random.key(0), images)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, images)[0] ** 2)
  g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_drop_path_is_per_sample_and_only_in_training():
  encoder = vit.ViTEncoder(img_size=16, patch_size=4, width=32, depth=2, num_heads=2, drop_path_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  params = encoder.init(jax.random.key(0), images)
  eval_a, eval_b = encoder.apply(params, images)[0], encoder.apply(params, images)[0]
  np.testing.assert_array_equal(eval_a, eval_b)
  train = encoder.apply(params, images, train=True, rngs={'dropout': jax.random.key(3)})[0]
  assert not np.allclose(train, eval_a)
