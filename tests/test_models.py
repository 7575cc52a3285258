"""The shared ViT pieces against the reference's definitions (formulas and element orders)."""
import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax import checkpoint
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
  m = masking.random_masking(noise, masking.num_kept(196, 0.75))
  assert masking.num_kept(196, 0.75) == 49 and m.ids_keep.shape == (3, 49) and m.mask.dtype == jnp.float32
  order = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(np.asarray(m.ids_keep), order[:, :49])  # MAE's order: ascending noise
  kept = masking.gather(tokens, m.ids_keep)
  np.testing.assert_array_equal(np.asarray(kept), np.take_along_axis(np.asarray(tokens), order[:, :49, None], 1))
  expected_mask = np.ones((3, 196))
  np.put_along_axis(expected_mask, order[:, :49], 0, axis=1)
  np.testing.assert_array_equal(np.asarray(m.mask), expected_mask)
  # Unshuffling with a zero mask token puts every kept token back in its place and zeros elsewhere.
  restored = masking.unshuffle(kept, jnp.zeros((1, 1, 8)), m.ids_restore)
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(tokens) * (1 - expected_mask)[..., None])


def test_dynamic_mask_is_exact_for_traced_counts_and_compiles_once():
  noise = jax.random.uniform(jax.random.key(0), (4, 50))
  traces = []

  @jax.jit
  def masked(noise, count):
    traces.append(count)  # runs once per trace
    return masking.dynamic_mask(noise, count)

  order = np.argsort(np.asarray(noise), axis=1)
  for count in (0, 7, 31, 50):
    mask = np.asarray(masked(noise, jnp.asarray(count, jnp.int32)))
    expected = np.zeros((4, 50), np.float32)
    np.put_along_axis(expected, order[:, :count], 1.0, axis=1)  # 1 at the smallest noise
    np.testing.assert_array_equal(mask, expected)
  assert len(traces) == 1 and masked._cache_size() == 1


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


SMALL = dict(img_size=16, patch_size=4, width=32, depth=2, num_heads=2)


def test_encoder_param_names_mirror_the_pytorch_layout():
  encoder = vit.ViT(**SMALL)
  params = encoder.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert set(params) == {'patch_embed', 'cls_token', 'blocks_0', 'blocks_1', 'norm'}
  assert set(params['blocks_0']) == {'norm1', 'attn', 'norm2', 'mlp'}
  assert params['blocks_0']['attn']['qkv']['kernel'].shape == (32, 96)
  assert params['patch_embed']['proj']['kernel'].shape == (4, 4, 3, 32)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  f32 = vit.ViT(**SMALL)
  bf16 = f32.clone(dtype=jnp.bfloat16)
  params = f32.init(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  out32, out16 = f32.apply(params, images)['tokens'], bf16.apply(params, images)['tokens']
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), np.asarray(out32), atol=0.1)


@pytest.mark.slow
def test_attention_core_backward_matches_autodiff_of_the_softmax():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 3, 7, 8)) for i in range(3))
  d_out = jax.random.normal(jax.random.key(3), (2, 3, 7, 8))

  def plain(q, k, v):
    weights = jax.nn.softmax(jnp.einsum('nhqd,nhkd->nhqk', q, k) / math.sqrt(8), axis=-1)
    return jnp.einsum('nhqk,nhkd->nhqd', weights, v)

  out, vjp = jax.vjp(vit.attention_core, q, k, v)
  want_out, want_vjp = jax.vjp(plain, q, k, v)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  for got, want in zip(vjp(d_out), want_vjp(d_out)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_remat_does_not_change_outputs_or_gradients():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  plain = vit.ViT(**SMALL)
  remat = plain.clone(remat=True)
  params = plain.init(jax.random.key(0), images)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, images)['tokens'] ** 2)
  g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)


def test_drop_path_is_per_sample_and_only_in_training():
  """Block 1's two residual branches (rate 0.5; block 0's rate is 0) are each dropped or kept, and rescaled
  by 1 / keep, per sample: every sample's output is one of the four combinations, and several occur."""
  encoder = vit.ViT(**SMALL, drop_path_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (16, 16, 16, 3))
  params = encoder.init(jax.random.key(0), images)
  eval_a, eval_b = encoder.apply(params, images), encoder.apply(params, images)
  np.testing.assert_array_equal(eval_a['tokens'], eval_b['tokens'])
  train = encoder.apply(params, images, train=True, rngs={'dropout': jax.random.key(3)})
  x0 = train['blocks'][0]
  np.testing.assert_array_equal(x0, eval_a['blocks'][0])  # rate 0: never dropped
  p = params['params']['blocks_1']
  norm = lambda name, x: nn.LayerNorm(epsilon=1e-6).apply({'params': p[name]}, x)
  attn = vit.Attention(2).apply({'params': p['attn']}, norm('norm1', x0))
  combos = {}
  for keep_attn in (0, 1):
    x1 = x0 + keep_attn * attn / 0.5
    mlp = vit.Mlp(128).apply({'params': p['mlp']}, norm('norm2', x1), True)
    for keep_mlp in (0, 1):
      combos[keep_attn, keep_mlp] = np.asarray(x1 + keep_mlp * mlp / 0.5)
  out = np.asarray(train['pre_norm'])
  seen = [[c for c, want in combos.items() if np.allclose(out[i], want[i], atol=1e-5)] for i in range(len(out))]
  assert all(len(s) == 1 for s in seen), seen
  seen = {s[0] for s in seen}
  assert (0, 0) in seen and (1, 1) in seen and len(seen) >= 3, seen


def vit_to_timm(params):
  """Our ViT's params -> timm VisionTransformer state_dict: the same names, torch layouts."""
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params, sep='.').items():
    key = re.sub(r'blocks_(\d+)', r'blocks.\1', path)
    value = np.asarray(value)
    if key.endswith('.kernel'):  # flax (in, out) / (p, p, c, D) -> torch (out, in) / (D, c, p, p)
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    out[re.sub(r'\.(kernel|scale)$', '.weight', key)] = value
  return out


@pytest.mark.parametrize('pool', ['gap', 'cls'])
def test_classifier_matches_timm(pool):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  model = vit.ViT(img_size=32, patch_size=4, width=64, depth=2, num_heads=4, posemb='learned', pool=pool,
                  num_classes=10)
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 3), np.float32)
  params = model.init(jax.random.key(0), images)['params']
  assert ('fc_norm' in params) == (pool == 'gap') and ('norm' in params) == (pool == 'cls')
  rng = np.random.default_rng(1)  # every param random, norms and biases too
  params = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), params)
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10,
      global_pool='avg' if pool == 'gap' else 'token', fc_norm=pool == 'gap').eval()
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in vit_to_timm(params).items()}, strict=True)
  with jax.default_matmul_precision('highest'):
    out = model.apply({'params': params}, images)
  with torch.no_grad():
    want = reference(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  assert out['logits'].dtype == jnp.float32 and out['pooled'].shape == (3, 64)
  np.testing.assert_allclose(np.asarray(out['logits']), want, atol=1e-5)


def test_learned_posemb_head_and_no_cls_token_options():
  images = jnp.zeros((2, 16, 16, 3))
  model = vit.ViT(**SMALL, posemb='learned', pool='gap', num_classes=5)
  params = model.init(jax.random.key(0), images)['params']
  assert set(params) == {'patch_embed', 'cls_token', 'pos_embed', 'blocks_0', 'blocks_1', 'fc_norm', 'head'}
  assert params['pos_embed'].shape == (1, 17, 32) and 0.01 < float(params['pos_embed'].std()) < 0.03
  assert not params['head']['bias'].any() and float(jnp.abs(params['head']['kernel']).max()) < 1e-4
  assert 'tokens' not in model.apply({'params': params}, images)
  plain = vit.ViT(**SMALL, posemb='learned', cls_token=False, pool='gap')
  params = plain.init(jax.random.key(0), images)['params']
  assert 'cls_token' not in params and params['pos_embed'].shape == (1, 16, 32)
  out = plain.apply({'params': params}, images)
  assert out['pre_norm'].shape == (2, 16, 32) and out['pooled'].shape == (2, 32)
  for bad, match in [(dict(num_classes=3), 'needs pooled'), (dict(pool='cls', cls_token=False), 'cls token'),
                     (dict(posemb='rope'), 'posemb'), (dict(stem='tokens'), 'vocab')]:
    with pytest.raises(ValueError, match=match):
      vit.ViT(**SMALL, **bad).init(jax.random.key(0), images)


def test_token_stem_embeds_int_ids():
  model = vit.ViT(**SMALL, stem='tokens', vocab_size=20)
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 20)
  params = model.init(jax.random.key(0), ids)['params']
  assert 'patch_embed' not in params and params['token_embed']['embedding'].shape == (20, 32)
  out = model.apply({'params': params}, ids)
  expected = params['token_embed']['embedding'][ids] + vit.posemb_sincos_2d(32, (4, 4))[None, 1:]
  np.testing.assert_allclose(out['embedded'], expected, atol=1e-6)
  assert out['tokens'].shape == (2, 17, 32)


def test_blocks_and_ids_keep_select_tokens_after_the_position_embedding():
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  model = vit.ViT(**SMALL)
  params = model.init(jax.random.key(0), images)
  full = model.apply(params, images)
  assert len(full['blocks']) == 2
  np.testing.assert_array_equal(full['blocks'][-1], full['pre_norm'])
  ids = jnp.stack([jax.random.permutation(jax.random.key(k), 16)[:5] for k in (2, 3)])
  no_blocks = model.clone(depth=0)
  kept = no_blocks.apply(params, images, ids)
  np.testing.assert_array_equal(kept['embedded'], full['embedded'])
  np.testing.assert_array_equal(kept['pre_norm'][:, 1:], masking.gather(full['embedded'], ids))
  # Attention is permutation-equivariant: encoding a shuffle of every token shuffles the outputs, which holds
  # only if positions were added before the selection.
  perm = jnp.stack([jax.random.permutation(jax.random.key(k), 16) for k in (4, 5)])
  shuffled = model.apply(params, images, perm)
  np.testing.assert_allclose(shuffled['tokens'][:, 1:], masking.gather(full['tokens'][:, 1:], perm), atol=1e-5)


def torch_resample(table, grid, num_prefix_tokens=1):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  return timm.layers.resample_abs_pos_embed(torch.from_numpy(table), new_size=grid,
                                            num_prefix_tokens=num_prefix_tokens, antialias=False).numpy()


@pytest.mark.parametrize('side,grid,prefix', [(14, (16, 16), 1), (16, (14, 14), 1), (14, (10, 18), 1),
                                              (7, (16, 16), 0), (12, (12, 12), 1)])
def test_resample_posemb_matches_timm(side, grid, prefix):
  table = np.random.default_rng(side).standard_normal((1, prefix + side * side, 64)).astype(np.float32)
  out = vit.resample_posemb(table, grid, prefix)
  assert out.shape == (1, prefix + grid[0] * grid[1], 64) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, :prefix], table[:, :prefix])
  np.testing.assert_allclose(out, torch_resample(table, list(grid), prefix), atol=1e-5)


def test_warm_start_resamples_a_learned_position_table(capsys):
  model = lambda img_size: vit.ViT(img_size=img_size, patch_size=2, width=32, depth=1, num_heads=2, posemb='learned')
  init = lambda img_size: {'encoder': jax.device_get(
      model(img_size).init(jax.random.key(img_size), jnp.zeros((1, img_size, img_size, 3)))['params'])}
  source, target = init(28), init(32)
  merged = checkpoint.merge_matching(target, source, 'the 14x14 run')
  np.testing.assert_array_equal(merged['encoder']['pos_embed'], vit.resample_posemb(source['encoder']['pos_embed'], 16))
  assert merged['encoder']['pos_embed'].shape == (1, 257, 32)
  np.testing.assert_array_equal(merged['encoder']['blocks_0']['attn']['qkv']['kernel'],
                                source['encoder']['blocks_0']['attn']['qkv']['kernel'])
  assert "resampled ['encoder']['pos_embed'] 14x14 -> 16x16" in capsys.readouterr().out
