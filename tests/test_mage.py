"""MAGE: forward parity with an independent PyTorch MAGE, the reference's masking, configs, export, training."""
import json
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, run_cli, run_main

from mae_jax import config as config_lib
from mae_jax import export, objectives, sharding, train
from mae_jax.data import transforms
from mae_jax.models import vit, vqgan
from mae_jax.objectives import mage

torch = pytest.importorskip('torch')
scipy_stats = pytest.importorskip('scipy.stats')
nn = torch.nn


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


# ---- an independent PyTorch MAGE: LTH14/mage models_mage.py's module structure (spec mage.md 1.2-1.5) ----

class TorchAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.scale = heads, (dim // heads) ** -0.5
    self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)
    self.attn_drop, self.proj_drop = nn.Dropout(0.1), nn.Dropout(0.1)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q.float() @ k.float().transpose(-2, -1)) * self.scale  # fp32, max subtracted, as the reference
    attn = self.attn_drop((attn - attn.max(dim=-1, keepdim=True)[0]).softmax(dim=-1))
    return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class TorchMlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(0.1)

  def forward(self, x):
    return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TorchBlock(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TorchAttention(dim, heads)
    self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TorchMlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class BertEmbeddings(nn.Module):
  def __init__(self, vocab, dim, positions):
    super().__init__()
    self.word_embeddings, self.position_embeddings = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)
    self.LayerNorm, self.dropout = nn.LayerNorm(dim, eps=1e-6), nn.Dropout(0.1)  # pylint: disable=invalid-name
    self.register_buffer('position_ids', torch.arange(positions).expand((1, -1)))

  def forward(self, ids):
    x = self.word_embeddings(ids) + self.position_embeddings(self.position_ids[:, :ids.shape[1]])
    return self.dropout(self.LayerNorm(x))


class MlmLayer(nn.Module):
  def __init__(self, feat_dim, word_dim, vocab):
    super().__init__()
    self.fc, self.gelu, self.ln = nn.Linear(feat_dim, word_dim), nn.GELU(), nn.LayerNorm(word_dim)  # eps 1e-5
    self.bias = nn.Parameter(torch.zeros(1, 1, vocab))

  def forward(self, x, word_embeddings):
    return torch.matmul(self.ln(self.gelu(self.fc(x))), word_embeddings.transpose(0, 1)) + self.bias


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)


class TorchMAGE(nn.Module):
  """`MaskedGenerativeEncoderViT` without its VQGAN (the tests give it token ids) and its unused modules."""

  def __init__(self, dim, depth, heads, dec_dim, dec_depth, dec_heads, codebook=1024, seq_len=256, patch=16,
               mask_ratio_min=0.5):
    super().__init__()
    self.codebook, self.seq_len, self.mask_ratio_min = codebook, seq_len, mask_ratio_min
    vocab = codebook + 1000 + 1
    self.fake_class_label, self.mask_token_label = codebook + 1100 - 1024, vocab - 1
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, seq_len + 1, dim), requires_grad=False)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, seq_len + 1, dec_dim), requires_grad=False)
    self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq_len + 1, dec_dim))
    self.token_emb = BertEmbeddings(vocab, dim, seq_len + 1)
    self.patch_embed = PatchEmbed(patch, dim)
    self.blocks = nn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.decoder_embed = nn.Linear(dim, dec_dim)
    self.decoder_blocks = nn.ModuleList([TorchBlock(dec_dim, dec_heads) for _ in range(dec_depth)])
    self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
    self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)
    self.mlm_layer = MlmLayer(dec_dim, dim, vocab)

  def forward_encoder(self, token_indices, mask_rate, noise):
    bsz, seq_len = token_indices.shape
    num_dropped = int(np.ceil(seq_len * self.mask_ratio_min))
    num_masked = int(np.ceil(seq_len * mask_rate))
    sorted_noise, _ = torch.sort(noise, dim=1)
    token_drop_mask = (noise <= sorted_noise[:, num_dropped - 1:num_dropped]).float()
    token_all_mask = (noise <= sorted_noise[:, num_masked - 1:num_masked]).float()
    token_indices = token_indices.clone()
    token_indices[token_all_mask.nonzero(as_tuple=True)] = self.mask_token_label
    token_indices = torch.cat([torch.full((bsz, 1), self.fake_class_label), token_indices], dim=1)
    token_drop_mask = torch.cat([torch.zeros(bsz, 1), token_drop_mask], dim=1)
    token_all_mask = torch.cat([torch.zeros(bsz, 1), token_all_mask], dim=1)
    x = self.token_emb(token_indices)
    x = x[(1 - token_drop_mask).nonzero(as_tuple=True)].reshape(bsz, -1, x.shape[-1])  # ascending positions
    for block in self.blocks:
      x = block(x)
    return self.norm(x), token_drop_mask, token_all_mask

  def forward_decoder(self, x, token_drop_mask, token_all_mask):
    x = self.decoder_embed(x)
    mask_tokens = x[:, 0:1].repeat(1, token_all_mask.shape[1], 1)  # pad with the position-0 output
    x_after_pad = mask_tokens.clone()
    x_after_pad[(1 - token_drop_mask).nonzero(as_tuple=True)] = x.reshape(x.shape[0] * x.shape[1], x.shape[2])
    x_after_pad = torch.where(token_all_mask.unsqueeze(-1).bool(), mask_tokens, x_after_pad)
    x = x_after_pad + self.decoder_pos_embed_learned
    for block in self.decoder_blocks:
      x = block(x)
    return self.mlm_layer(self.decoder_norm(x), self.token_emb.word_embeddings.weight.data.detach())

  def forward(self, token_indices, mask_rate, noise):
    """(loss, logits, token_all_mask) on given ids, ratio and noise (the reference draws the last two)."""
    latent, drop, all_mask = self.forward_encoder(token_indices, mask_rate, noise)
    logits = self.forward_decoder(latent, drop, all_mask)
    logprobs = torch.log_softmax(logits[:, 1:, :self.codebook].reshape(-1, self.codebook), dim=-1)
    nll = -logprobs.gather(dim=-1, index=token_indices.reshape(-1, 1)).squeeze(1)
    loss = 0.9 * nll + 0.1 * (-logprobs.mean(dim=-1))  # LabelSmoothingCrossEntropy(smoothing=0.1), per token
    mask = all_mask[:, 1:].reshape(-1)
    return (loss * mask).sum() / mask.sum(), logits, latent


def torch_mage(objective):
  enc, dec, config = objective.encoder, objective.decoder, objective.config
  return TorchMAGE(enc.width, enc.depth, enc.num_heads, dec.width, dec.depth, dec.num_heads, objective.codebook_size,
                   enc.num_patches, enc.patch_size, config.mage.mask_ratio_min).eval()


# ---- helpers ----

def tiny_config(**mage_fields):
  c = load_config('mage_tiny_cpu')
  c.model.variant = 'pico/4'
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.mage.update(mage_fields)
  return c


def random_tree(abstract, seed):
  """Every leaf random (biases and norms too, unlike a fresh init), cheap even for ViT-B."""
  rng = np.random.default_rng(seed)
  flat = flax.traverse_util.flatten_dict(abstract, sep='/')
  out = {path: (1 + 0.1 * rng.standard_normal(s.shape, np.float32) if path.endswith('scale') else
                0.02 * rng.standard_normal(s.shape, np.float32)) for path, s in flat.items()}
  return flax.traverse_util.unflatten_dict(out, sep='/')


def random_params(objective, seed=0):
  return random_tree(jax.eval_shape(objective.init, jax.random.key(0)), seed)


def random_tokenizer(config, seed=1):
  """VQGAN params of config.vqgan's sizes, random."""
  return random_tree(vqgan.abstract_params(vqgan.from_config(config.vqgan)), seed)


def write_tokenizer(path, params):
  """A tokenizer file as `python -m mae_jax.export import --format=vqgan` writes it: {'vqgan': params}."""
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize({'vqgan': params}))
  return str(path)


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def param_count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def to_torch_sd(state_dict):
  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def parity(config, batch=2, mask_ratio=0.6, seed=0):
  """(JAX outputs, torch (loss, logits, latent), the exported state_dict, params) on the same ids and noise."""
  objective = objectives.create(config)
  params = random_params(objective, seed)
  rng = np.random.default_rng(seed + 1)
  ids = rng.integers(0, objective.codebook_size, (batch, objective.num_tokens)).astype(np.int32)
  noise = rng.random((batch, objective.num_tokens), np.float32)
  forward = jax.jit(lambda p, i, n: objective.forward(p, i, n, jnp.float32(mask_ratio)))
  out = jax.device_get(forward(params, ids, noise))
  out['loss'] = float(mage.token_loss(out['logits'], ids, out['masked'], objective.codebook_size, 0.1))
  state_dict = export.export_state_dict(params, config, 'mage-official')
  model = torch_mage(objective)
  model.load_state_dict(to_torch_sd(state_dict), strict=True)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long(), mask_ratio, torch.from_numpy(noise))
  return objective, out, [w.numpy() if hasattr(w, 'numpy') else w for w in want], state_dict, params


# ---- must-show 2: forward parity and the export round trip ----

@pytest.mark.slow
def test_vitb_forward_matches_the_pytorch_mage_and_exports_round_trip():
  config = load_config('mage_vitb')
  objective, out, (loss, logits, latent), state_dict, params = parity(config)
  assert out['latent'].shape == (2, 129, 768) == latent.shape  # the encoder sees 1 + 256 - 128 tokens
  assert out['masked'].sum(1).tolist() == [154, 154] and out['dropped'].sum(1).tolist() == [128, 128]  # ceil(153.6)
  errs = max_err(out['logits'], logits), abs(out['loss'] - float(loss)), max_err(out['latent'], latent)
  print(f'MAGE ViT-B vs PyTorch: max |d| logits {errs[0]:.2e}, loss {errs[1]:.2e} ({out["loss"]:.6f}), '
        f'encoder output {errs[2]:.2e}')
  assert errs[0] < 1e-4 and errs[1] < 1e-5
  assert len(state_dict) == 433 - 168  # the reference's keys but the VQGAN's: the tokenizer is not in the params
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), vqgan.abstract_params(objective.tokenizer))
  with_tokenizer = export.export_state_dict({**params, 'tokenizer': zeros}, config, 'mage-official')
  assert len(with_tokenizer) == 433 and sum(k.startswith('vqgan.') for k in with_tokenizer) == 168
  # Import takes the file back bitwise (the VQGAN keys are the tokenizer's, imported on its own).
  back = export.import_state_dict(state_dict, config, 'mage-official', ignore=('vqgan.*',))
  flat, flat_back = (flax.traverse_util.flatten_dict(t, sep='/') for t in (params, back))
  assert flat.keys() == flat_back.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(flat_back[path], value, err_msg=path)


def test_export_with_the_tokenizer_has_the_reference_keys_and_the_tokenizer_round_trips():
  """With the frozen tokenizer in the params (the loop's `with_frozen`), the vqgan.* keys are those of the
  tokenizer's own format, and they import back bitwise through it."""
  config = tiny_config()
  objective = objectives.create(config)
  params, tokenizer = random_params(objective), random_tokenizer(config)
  state_dict = export.export_state_dict({**params, 'tokenizer': tokenizer}, config, 'mage-official')
  vq_keys = {k for k in state_dict if k.startswith('vqgan.')}
  tokenizer_config = config.copy_and_resolve_references()
  tokenizer_config.objective = 'vqgan'
  alone = export.export_state_dict({'vqgan': tokenizer}, tokenizer_config, 'vqgan')
  assert vq_keys == {f'vqgan.{k}' for k in alone}
  back = export.import_state_dict({k[len('vqgan.'):]: v for k, v in state_dict.items() if k in vq_keys},
                                  tokenizer_config, 'vqgan')['vqgan']
  jax.tree.map(np.testing.assert_array_equal, back, tokenizer)
  # The unused entries: deterministic ones as the reference initialises them, random ones zero.
  np.testing.assert_array_equal(state_dict['token_emb.position_ids'], np.arange(65)[None])
  assert state_dict['token_emb.position_ids'].dtype == np.int64 and not state_dict['decoder_pred.weight'].any()
  np.testing.assert_array_equal(state_dict['decoder_pos_embed'], vit.posemb_sincos_2d(32, (8, 8))[None])  # MAE's


def test_tiny_forward_matches_pytorch_and_the_reference_shapes():
  objective, out, (loss, logits, _), state_dict, _ = parity(tiny_config(), batch=3, mask_ratio=0.93)
  assert max_err(out['logits'], logits) < 1e-5 and abs(out['loss'] - float(loss)) < 1e-6
  assert out['masked'].sum(1).tolist() == [60] * 3  # ceil(64 * 0.93)
  assert state_dict['token_emb.word_embeddings.weight'].shape == (128 + 1001, 32)
  assert state_dict['mlm_layer.bias'].shape == (1, 1, 1129) and state_dict['token_emb.position_embeddings.weight'].shape == (65, 32)
  assert (objective.vocab_size, objective.fake_class_id, objective.mask_id) == (1129, 204, 1128)
  assert mage.vocabulary(1024) == (2025, 1100, 2024)


# ---- must-show 3: the mask-ratio sampler and the token counts ----

def test_mask_ratio_sampler_and_the_token_counts():
  ratios = jax.jit(jax.vmap(mage.sample_mask_ratio))(jax.random.split(jax.random.key(0), 10_000))
  ratios = np.asarray(ratios, np.float64)
  ks = scipy_stats.kstest(ratios, scipy_stats.truncnorm(-0.2, 1.8, loc=0.55, scale=0.25).cdf)
  print(f'mask ratio vs truncnorm(-0.2, 1.8, 0.55, 0.25): KS statistic {ks.statistic:.4f}, p {ks.pvalue:.3f}')
  assert ks.pvalue > 0.01 and 0.5 <= ratios.min() and ratios.max() <= 1.0
  noise = jax.random.uniform(jax.random.key(1), (10_000, 1, 256))

  def counts(row, ratio):
    ids_keep, dropped, masked = mage.token_masks(row, 128, mage.num_masked_tokens(256, ratio))
    return ids_keep[0], dropped[0], masked[0]
  ids_keep, dropped, masked = jax.device_get(jax.jit(jax.vmap(counts))(noise, ratios.astype(np.float32)))
  assert (dropped.sum(1) == 128).all()
  np.testing.assert_array_equal(masked.sum(1), np.ceil(256 * ratios.astype(np.float32).astype(np.float64)))
  assert (masked | ~dropped).all()  # the masked tokens include the dropped ones
  assert (np.diff(ids_keep, axis=1) > 0).all()  # kept in ascending position order
  np.testing.assert_array_equal(ids_keep, np.nonzero(~dropped)[1].reshape(10_000, 128))
  # The lowest noise is dropped first, then masked.
  order = np.argsort(np.asarray(noise[:, 0]), axis=1)
  assert dropped[np.arange(10_000)[:, None], order[:, :128]].all()


def test_the_loss_draws_its_ratio_from_the_step_key_and_masks_by_the_example_keys():
  config = tiny_config()
  objective = objectives.create(config)
  params = {**random_params(objective), 'tokenizer': random_tokenizer(config)}
  images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), 4))
  loss_fn = jax.jit(lambda rng, k: objective.loss_fn(params, {'image': images, 'example_key': k}, rng, False))
  loss, metrics = loss_fn(jax.random.key(3), keys)
  np.testing.assert_array_equal(loss_fn(jax.random.key(3), keys)[0], loss)  # a pure function of the keys
  ratio_rng, _ = jax.random.split(jax.random.key(3))
  np.testing.assert_array_equal(metrics['mage/mask_ratio'], mage.sample_mask_ratio(ratio_rng))
  ids = jax.jit(objective.tokenize)(params['tokenizer'], images)
  noise = jax.vmap(lambda k: jax.random.uniform(jax.random.wrap_key_data(k), (64,)))(keys)
  forward = jax.jit(objective.forward)
  out = forward(params, ids, noise, metrics['mage/mask_ratio'])
  np.testing.assert_allclose(loss, mage.token_loss(out['logits'], ids, out['masked'], 128, 0.1), rtol=1e-6)
  # The first half of a batch masks the same tokens alone: nothing depends on how the batch is split.
  half = forward(params, ids[:2], noise[:2], metrics['mage/mask_ratio'])
  np.testing.assert_array_equal(half['masked'], out['masked'][:2])
  assert float(metrics['mage/masked_accuracy']) <= 1


def test_dropout_is_active_in_training_only():
  config = tiny_config()
  objective = objectives.create(config)
  params = random_params(objective)
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, 128)
  noise = jax.random.uniform(jax.random.key(2), (2, 64))
  forward = jax.jit(objective.forward, static_argnums=5)
  run = lambda rng, train: forward(params, ids, noise, 0.7, rng, train)['logits']
  np.testing.assert_array_equal(run(None, False), run(jax.random.key(3), False))
  trained = run(jax.random.key(3), True)
  assert max_err(trained, run(None, False)) > 1e-3
  np.testing.assert_array_equal(trained, run(jax.random.key(3), True))
  encoder = objective.encoder
  assert (encoder.dropout, encoder.attn_dropout, encoder.embed_dropout) == (0.1, 0.1, 0.1)


def test_the_reference_initialisation():
  config = tiny_config(token_init_std=0.02, pos_init='normal')  # the defaults (the demo changes both)
  defaults = objectives.OBJECTIVES['mage'].default_config()
  assert all(defaults[k] == config.mage[k] for k in ('token_init_std', 'pos_init'))
  params = jax.jit(objectives.create(config).init)(jax.random.key(0))
  enc, dec = params['encoder'], params['decoder']
  for table in (enc['token_embed']['embedding'], enc['pos_embed'], dec['decoder_pos_embed_learned']):
    assert abs(float(table.std()) - 0.02) < 0.003 and abs(float(table.mean())) < 0.002
  qkv = np.asarray(enc['blocks_0']['attn']['qkv']['kernel'])  # xavier_uniform of the fused (3D, D) matrix
  bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  for bias in (enc['blocks_0']['attn']['qkv']['bias'], dec['mlm_layer']['bias'], dec['mlm_layer']['fc']['bias']):
    assert not np.asarray(bias).any()
  assert (np.asarray(enc['embed_norm']['scale']) == 1).all() and (np.asarray(dec['mlm_layer']['ln']['scale']) == 1).all()


def test_the_short_schedule_init_scales_the_word_embedding_and_starts_both_tables_from_sincos():
  config = tiny_config(token_init_std=0.2, pos_init='sincos')
  objective = objectives.create(config)
  params = jax.jit(objective.init)(jax.random.key(0))
  enc, dec = params['encoder'], params['decoder']
  assert abs(float(enc['token_embed']['embedding'].std()) - 0.2) < 0.02
  grid = objective.encoder.grid_size
  tables = (enc['pos_embed'], objective.encoder.width), (dec['decoder_pos_embed_learned'], objective.decoder.width)
  for table, width in tables:
    np.testing.assert_array_equal(table[0], vit.posemb_sincos_2d(width, grid))  # a zero row for the fake class
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, 128)
  noise = jax.random.uniform(jax.random.key(2), (2, 64))

  def loss(p):
    out = objective.forward(p, ids, noise, 0.7)
    return mage.token_loss(out['logits'], ids, out['masked'], 128, 0.1)
  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads['encoder']['pos_embed']).max()) > 0  # still learned
  assert float(jnp.abs(grads['decoder']['decoder_pos_embed_learned']).max()) > 0


def test_word_embedding_gets_no_gradient_through_the_output_head():
  config = tiny_config()
  objective = objectives.create(config)
  params = random_params(objective)
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, 128)
  noise = jax.random.uniform(jax.random.key(2), (2, 64))

  def through_head(word_embeddings):
    latent = jnp.ones((2, 33, 32))
    kept = jnp.arange(65)[None] < 33
    return jnp.sum(objective.decoder.apply({'params': params['decoder']}, latent, kept, ~kept, word_embeddings))
  assert not jax.jit(jax.grad(through_head))(params['encoder']['token_embed']['embedding']).any()

  def loss(p):
    out = objective.forward(p, ids, noise, 0.7)
    return mage.token_loss(out['logits'], ids, out['masked'], 128, 0.1), out['masked']
  grads, masked = jax.jit(jax.grad(loss, has_aux=True))(params)
  seen = np.asarray(ids)[~np.asarray(masked)]  # the ids the encoder saw, with the fake class and [MASK]
  used = np.unique(np.concatenate([[objective.fake_class_id, objective.mask_id], seen]))
  row_norms = np.abs(np.asarray(grads['encoder']['token_embed']['embedding'])).sum(1)
  assert (row_norms[used] > 0).all() and not np.delete(row_norms, used).any()  # only the input side trains it


# ---- MAGE-C ----

def test_nt_xent_is_simclr_loss():
  z1, z2 = np.random.default_rng(0).standard_normal((2, 6, 8)).astype(np.float32)
  loss, _ = mage.nt_xent(jnp.asarray(z1), jnp.asarray(z2), 0.2)
  z = torch.nn.functional.normalize(torch.from_numpy(np.concatenate([z1, z2])), dim=1)
  sim = z @ z.T / 0.2
  sim.fill_diagonal_(-float('inf'))
  want = torch.nn.functional.cross_entropy(sim, torch.cat([torch.arange(6, 12), torch.arange(0, 6)]))
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)


def test_contrastive_views_are_pure_functions_of_the_example_keys():
  config = tiny_config(contrastive=dict(weight=0.1))
  images = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3))
  keys = jax.random.key_data(jax.random.split(jax.random.key(1), 4))
  def views(keys, images, section):
    return jax.jit(lambda k, x: transforms.contrastive_views(k, x, section))(keys, images)
  v1, v2 = views(keys, images, config.mage.contrastive)
  assert v1.shape == images.shape and float(v1.min()) >= 0 and float(v1.max()) <= 1
  assert max_err(v1, v2) > 0.05 and max_err(v1, images) > 0.05
  a1, _ = views(keys[2:], images[2:], config.mage.contrastive)  # the same examples in another batch
  np.testing.assert_allclose(a1, v1[2:], atol=1e-6)
  # The crop's geometry, read off a linear ramp (bilinear resampling keeps it linear away from the borders):
  # channel 0 is the row's position, channel 1 the column's.
  plain = config.mage.contrastive.copy_and_resolve_references()
  plain.update(crop_scale=(0.3, 0.6), color_jitter_prob=0.0, grayscale_prob=0.0)
  centres = (np.arange(32) + 0.5) / 32
  ramp = np.stack(np.broadcast_arrays(centres[:, None], centres[None, :], 0.5), -1).astype(np.float32)
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), 64))
  crops = np.asarray(views(keys, jnp.broadcast_to(ramp, (64, 32, 32, 3)), plain)[0], np.float64)
  h = (crops[:, 28, 16, 0] - crops[:, 3, 16, 0]) / 25 * 32  # the crop's height, a fraction of the image's
  w = np.abs(crops[:, 16, 28, 1] - crops[:, 16, 3, 1]) / 25 * 32
  assert (h * w > 0.3 - 1e-4).all() and (h * w < 0.6 + 1e-4).all()
  assert (w / h > 3 / 4 - 1e-4).all() and (w / h < 4 / 3 + 1e-4).all()
  flipped = crops[:, 16, 28, 1] < crops[:, 16, 3, 1]
  assert 10 < flipped.sum() < 54
  gray = plain.copy_and_resolve_references()
  gray.grayscale_prob = 1.0
  g = np.asarray(views(keys[:4], images, gray)[0])
  np.testing.assert_allclose(g[..., 0], g[..., 2], atol=1e-6)


def test_magec_adds_the_weighted_infonce_term():
  config = tiny_config(contrastive=dict(weight=0.1))
  objective = objectives.create(config)
  params = {**random_params(objective), 'tokenizer': random_tokenizer(config)}
  assert params['contrastive_head']['fc2']['kernel'].shape == (2048, 256)
  batch = {'image': jax.random.uniform(jax.random.key(1), (4, 32, 32, 3)),
           'example_key': jax.random.key_data(jax.random.split(jax.random.key(2), 4))}
  trained = {k: v for k, v in params.items() if k != 'tokenizer'}
  loss_fn = lambda p: objective.loss_fn({**p, 'tokenizer': params['tokenizer']}, batch, jax.random.key(3), False)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(trained)
  np.testing.assert_allclose(loss, metrics['loss/tokens'] + 0.1 * metrics['loss/contrastive'], rtol=1e-6)
  assert 0 < float(metrics['loss/contrastive']) and 0 <= float(metrics['mage/contrastive_accuracy']) <= 1
  assert float(jnp.abs(grads['contrastive_head']['fc1']['kernel']).sum()) > 0


# ---- configs, the tokenizer file, visualisation ----

@pytest.mark.parametrize('name,used,encoder,reference', [
    ('mage_vitb', 144_896_745, 86_810_112, 146_474_217),
    ('mage_vitl', 407_788_521, 304_650_240, 409_891_561),
])
def test_paper_configs_build_with_the_reference_parameter_counts(name, used, encoder, reference):
  """Ours are the params MAGE uses; the reference's count (its module's parameters, VQGAN excluded) adds the
  ones it never uses, which 'mage-official' export writes (the position_ids buffer is not a parameter)."""
  config = load_config(name)
  objective = objectives.create(config)
  params = jax.eval_shape(objective.init, jax.random.key(0))
  assert param_count(params) == used and param_count(params['encoder']) == encoder
  unused = {k: v for k, v in objective.unused_reference_tensors().items() if not k.endswith('position_ids')}
  assert param_count(params) + param_count(unused) == reference
  c = config
  assert (c.data.img_size, c.data.interpolation, c.data.crop_scale, c.data.mean, c.data.std) == (
      256, 'bilinear', (0.2, 1.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  assert (c.train.batch_size, c.train.blr, c.train.b2, c.train.weight_decay, c.train.warmup_epochs, c.train.epochs,
          c.train.grad_clip, c.model.dropout) == (4096, 1.5e-4, 0.95, 0.05, 40, 1600, 3.0, 0.1)


@pytest.mark.parametrize('field, value, message', [
    ('mage.token_init_std', 0.0, r"token_init_std=0\.0 must be a number > 0"),
    ('mage.pos_init', 'fourier', r"pos_init='fourier': expected 'normal' or 'sincos'"),
    ('mage.label_smoothing', 1.0, r'label_smoothing=1\.0 must be in \[0, 1\)'),
    ('model.variant', 'convpico/4', r"MAGE encodes VQGAN tokens, which a ConvViT's pixel convolutions cannot read"),
    ('model.variant', 'pico/8', r"its patch size 8 must be the tokenizer's 4 pixels per token"),
])
def test_validate_names_the_bad_mage_field(field, value, message):
  config = tiny_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_a_paper_config_without_its_tokenizer_says_how_to_import_it(tmp_path):
  config = load_config('mage_vitb')
  config.mage.tokenizer = str(tmp_path / 'missing.msgpack')
  with pytest.raises(config_lib.ConfigError, match=r'vqgan_jax_strongaug\.ckpt.*--format=vqgan'):
    config_lib.validate(config)
  config.mage.tokenizer = write_tokenizer(tmp_path / 'tok.msgpack', random_tokenizer(tiny_config()))
  config_lib.validate(config)  # it exists; its shapes are checked when it is loaded
  config.data.update(source='embedded', name='digits')
  with pytest.raises(config_lib.ConfigError, match='mage.tokenizer.*does not fit'):
    train.Trainer(config, devices=jax.devices()[:1])


def test_visualize_shows_original_tokenized_masked_and_prediction():
  config = tiny_config()
  objective = objectives.create(config)
  params = {**random_params(objective), 'tokenizer': random_tokenizer(config)}
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  shown = jax.jit(objective.visualize)(params, images, jax.random.key(2))
  assert tuple(objective.image_columns) == ('original', 'tokenized', 'masked', 'prediction')
  assert all(shown[k].shape == images.shape for k in objective.image_columns)
  ids = jax.jit(objective.tokenize)(params['tokenizer'], images)
  np.testing.assert_allclose(shown['tokenized'], jax.jit(objective.detokenize)(params['tokenizer'], ids), atol=1e-6)
  blanked = np.asarray(shown['masked']).reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, -1)
  masked_tokens = (blanked == 0).all(-1)
  assert 32 <= masked_tokens.sum(1).min() and masked_tokens.sum(1).max() <= 64  # at least the dropped half


@pytest.mark.slow
def test_vitb_runs_one_real_train_step_on_cpu(tmp_path):
  config = load_config('mage_vitb')
  config.mage.tokenizer = write_tokenizer(tmp_path / 'vqgan.msgpack', random_tokenizer(config))
  config.train.update(batch_size=2, num_steps=1)
  config.data.update(source='embedded', name='digits', eval_split='test')  # an offline stand-in for ImageNet
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  assert 'tokenizer' in trainer.frozen and 'tokenizer' not in trainer.abstract_state['params']
  state = trainer.init_state()
  before = jax.device_get(state['params'])
  batch = sharding.global_batch(trainer.loader.local_batch(0), trainer.mesh)
  assert batch['image'].shape == (2, 256, 256, 3) and 0 <= float(batch['image'].min()) <= float(batch['image'].max()) <= 1
  state, metrics = trainer.train_step(state, batch)
  metrics = jax.device_get(metrics)
  print(f'ViT-B step: loss {metrics["loss"]:.4f}, mask ratio {metrics["mage/mask_ratio"]:.3f}, '
        f'grad norm {metrics["grad_norm"]:.3f}')
  assert np.isfinite(metrics['loss']) and 5 < metrics['loss'] < 9  # about log(1024) = 6.9 at init
  assert 0.5 <= metrics['mage/mask_ratio'] <= 1 and metrics['grad_norm'] > 0
  # The warm-up's first step has lr 0: the state moved to step 1, the params not yet.
  assert int(state['step']) == 1 and float(metrics['lr']) == 0.0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']), before)


# ---- the command line ----

@pytest.mark.slow
def test_the_tiny_config_trains_from_the_command_line(tmp_path):
  workdir = tmp_path / 'mage_tiny'
  result = run_main('--config=configs/mage_tiny_cpu.py', f'--workdir={workdir}', '--config.train.num_steps=6',
                    '--config.data.eval_split=', '--config.log.every_steps=3', '--config.log.images_every_steps=6',
                    '--config.checkpoint.every_steps=6', check=True)
  assert 'Training mage nano/4' in result.stdout and 'Done: 6 steps' in result.stdout, result.stdout
  records = [r for r in map(json.loads, open(workdir / 'metrics.jsonl')) if 'loss/tokens' in r]
  assert [r['step'] for r in records] == [3, 6] and all(0.5 <= r['mage/mask_ratio'] <= 1 for r in records)


@pytest.mark.slow
def test_bench_times_a_config_whose_tokenizer_is_not_imported_yet():
  out = run_cli('bench', '--config=configs/mage_tiny_cpu.py', '--config.model.variant=pico/4',
                '--config.mage.tokenizer=/nonexistent/vqgan.msgpack', '--per_device_batch=8', '--steps=2', '--warmup=1',
                timeout=600, check=True).stdout
  assert 'frozen networks          random weights for config.mage.tokenizer' in out, out
  assert 'model                    mage pico/4 at 32 px' in out and 'FLOPs per step' in out and 'finite: True' in out


@pytest.mark.slow
def test_tiny_demo_loss_falls_and_knn_beats_random_init(tmp_path):
  # Half the demo's 80 epochs, to keep CI's time: the kNN already beats random init there.
  result = run_main('--config=configs/mage_tiny_cpu.py', f'--workdir={tmp_path / "demo"}', '--config.train.epochs=40',
                    check=True, timeout=1800, optimized=True)
  losses = [r['loss'] for r in map(json.loads, open(tmp_path / 'demo' / 'metrics.jsonl')) if 'loss' in r]
  line = next(l for l in result.stdout.splitlines() if l.startswith('knn/top1 on digits/test'))
  before, after = map(float, re.findall(r'\d+\.\d+', line))  # 'knn/top1 on digits/test: random init B -> trained A'
  print(f'MAGE tiny demo: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({len(losses)} logs); {line}')
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5  # measured: 4.17 (step 20) -> 2.72
  assert after > before + 0.05  # measured: 0.5400 -> 0.7267 (80 epochs: 0.8733; the reference init, 20: 0.5067)
