"""The VQGAN tokenizer: parity with an independent PyTorch module of MAGE's layout (spec mage.md 1.1), the export
table both ways, the training objective (losses, straight-through gradient, codebook usage, EMA, the
adversarial players), the shipped tiny tokenizer, and one tiny training run from the command line."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, run_main

from mae_jax import config as config_lib
from mae_jax import data, frozen, objectives, sharding, train
from mae_jax.data import loader, sources
from mae_jax.evaluate.reconstruction import ReconstructionEvaluator
from mae_jax.export import engine, tables
from mae_jax.models import vqgan
from mae_jax.objectives.base import PhaseTrainable
from mae_jax.objectives.vqgan import codebook_usage, ema_update

torch = pytest.importorskip('torch')
F = torch.nn.functional
sg = jax.lax.stop_gradient


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


# ---- an independent PyTorch VQGAN with the layout of MAGE's taming port (spec 1.1) ----

class TorchResnetBlock(torch.nn.Module):

  def __init__(self, cin, cout, groups):
    super().__init__()
    self.changes_width = cin != cout
    self.norm1 = torch.nn.GroupNorm(groups, cin, eps=1e-6)
    self.conv1 = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.norm2 = torch.nn.GroupNorm(groups, cout, eps=1e-6)
    self.conv2 = torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    if self.changes_width:
      self.nin_shortcut = torch.nn.Conv2d(cout, cout, 1, bias=False)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return self.nin_shortcut(h) + h if self.changes_width else x + h


class TorchLevel(torch.nn.Module):

  def __init__(self, cin, cout, blocks, groups, upsample=False):
    super().__init__()
    self.block = torch.nn.ModuleList([TorchResnetBlock(cin if b == 0 else cout, cout, groups) for b in range(blocks)])
    if upsample:
      self.upsample = torch.nn.Module()
      self.upsample.conv = torch.nn.Conv2d(cout, cout, 3, padding=1)


class TorchMid(torch.nn.Module):

  def __init__(self, width, groups):
    super().__init__()
    self.block_1, self.block_2 = TorchResnetBlock(width, width, groups), TorchResnetBlock(width, width, groups)

  def forward(self, x):
    return self.block_2(self.block_1(x))


class TorchEncoder(torch.nn.Module):

  def __init__(self, ch, ch_mult, blocks, embed_dim, groups):
    super().__init__()
    widths = [ch * m for m in ch_mult]
    self.conv_in = torch.nn.Conv2d(3, ch, 3, padding=1, bias=False)
    self.down = torch.nn.ModuleList([TorchLevel(([ch] + widths)[l], widths[l], blocks, groups)
                                     for l in range(len(widths))])
    self.mid = TorchMid(widths[-1], groups)
    self.norm_out = torch.nn.GroupNorm(groups, widths[-1], eps=1e-6)
    self.conv_out = torch.nn.Conv2d(widths[-1], embed_dim, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for level, down in enumerate(self.down):
      for block in down.block:
        h = block(h)
      if level < len(self.down) - 1:
        h = F.avg_pool2d(h, 2, 2)
    return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class TorchDecoder(torch.nn.Module):

  def __init__(self, ch, ch_mult, blocks, embed_dim, groups):
    super().__init__()
    widths = [ch * m for m in ch_mult]
    self.conv_in = torch.nn.Conv2d(embed_dim, widths[-1], 3, padding=1)
    self.mid = TorchMid(widths[-1], groups)
    # up[level]: level l's blocks take the width of level l + 1 (or the bottom's), as the reference's insert(0, ...).
    self.up = torch.nn.ModuleList([TorchLevel((widths + [widths[-1]])[l + 1], widths[l], blocks, groups, upsample=l > 0)
                                   for l in range(len(widths))])
    self.norm_out = torch.nn.GroupNorm(groups, widths[0], eps=1e-6)
    self.conv_out = torch.nn.Conv2d(widths[0], 3, 3, padding=1)

  def forward(self, z):
    h = self.mid(self.conv_in(z))
    for level in reversed(range(len(self.up))):
      for block in self.up[level].block:
        h = block(h)
      if level > 0:
        h = self.up[level].upsample.conv(F.interpolate(h, scale_factor=2.0, mode='nearest'))
    return self.conv_out(F.silu(self.norm_out(h)))


class TorchVQModel(torch.nn.Module):
  """MAGE's `VQModel`: encoder, decoder, quantize (VectorQuantizer2, squared-distance argmin); no quant_conv."""

  def __init__(self, ch, ch_mult, num_res_blocks, embed_dim, n_embed, num_groups):
    super().__init__()
    self.encoder = TorchEncoder(ch, ch_mult, num_res_blocks, embed_dim, num_groups)
    self.decoder = TorchDecoder(ch, ch_mult, num_res_blocks, embed_dim, num_groups)
    self.quantize = torch.nn.Module()
    self.quantize.embedding = torch.nn.Embedding(n_embed, embed_dim)

  def encode(self, x):
    """(z (N, h, w, D), ids (N, h * w))."""
    z = self.encoder(x).permute(0, 2, 3, 1).contiguous()
    flat = z.view(-1, z.shape[-1])
    weight = self.quantize.embedding.weight
    d = flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * flat @ weight.t()
    return z, torch.argmin(d, dim=1).view(z.shape[0], -1)

  def decode_ids(self, ids):
    side = math.isqrt(ids.shape[1])
    z_q = self.quantize.embedding(ids).view(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return self.decoder(z_q)


def randomized_torch_vqgan(arch, seed=0):
  """torch's default conv init, GroupNorm affine away from identity, a normal codebook at the codes' scale."""
  torch.manual_seed(seed)
  model = TorchVQModel(arch.ch, tuple(arch.ch_mult), arch.num_res_blocks, arch.embed_dim, arch.n_embed,
                       arch.num_groups).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.GroupNorm):
        module.weight.copy_(1 + 0.2 * torch.randn_like(module.weight))
        module.bias.copy_(0.2 * torch.randn_like(module.bias))
    model.quantize.embedding.weight.normal_(0.0, 0.3)
  return model


def to_numpy_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def import_params(state_dict, arch):
  config = tokenizer_config(img_size=2 ** (len(arch.ch_mult) - 1), **arch)
  expected = jax.eval_shape(objectives.create(config).init, jax.random.key(0))
  return engine.from_torch(state_dict, 'vqgan', expected, {})['vqgan']


# The objective's tests use a one-level tokenizer (they compile a dozen programs): 16 px -> 16x16 ids of 32.
SMALL = dict(ch=8, ch_mult=(1,), num_res_blocks=1, embed_dim=8, n_embed=32, num_groups=4)


def tokenizer_config(img_size=32, **vq):
  c = load_config('vqgan_tiny_cpu')
  c.vqgan.update(vq)
  c.data.img_size = img_size
  config_lib.validate(c)
  return c


def relative_gaps(z, codebook):
  """Per token: (second-nearest - nearest squared distance) / |z|^2, in fp64. fp32 evaluates these distances
  to about 1e-7 of |z|^2 (and the two implementations' z differ by about as much), so a gap below 1e-5 is a tie
  that rounding may decide either way."""
  z = np.asarray(z, np.float64).reshape(-1, codebook.shape[1])
  d = np.sum((z[:, None] - codebook[None].astype(np.float64)) ** 2, -1)
  two = np.sort(d, axis=1)[:, :2]
  return (two[:, 1] - two[:, 0]) / np.sum(z**2, 1)


def check_parity(arch, images):
  """Encodes and decodes with both implementations; returns the figures, after asserting the tolerances."""
  model = randomized_torch_vqgan(arch)
  params = import_params(to_numpy_sd(model), arch)
  module = vqgan.from_config(arch)
  with torch.no_grad():
    z_torch, ids_torch = model.encode(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    decoded_torch = model.decode_ids(ids_torch).permute(0, 2, 3, 1).numpy()
  z_torch, ids_torch = z_torch.numpy(), ids_torch.numpy()
  z = jax.jit(lambda p, x: module.apply({'params': p}, x, method=vqgan.VQGAN.encode_latents))(params, images)
  ids = jax.jit(lambda p, x: module.apply({'params': p}, x, method=vqgan.VQGAN.encode))(params, images)
  decoded = jax.jit(lambda p, i: module.apply({'params': p}, i, method=vqgan.VQGAN.decode))(params, ids_torch)
  gaps = relative_gaps(z_torch, np.asarray(params['quantize']['embedding']))
  ties = gaps < 1e-5
  differ = np.asarray(ids) != ids_torch
  figures = {'tokens': ids.size, 'distinct_ids': len(np.unique(ids_torch)), 'ties': int(ties.sum()),
             'smallest_relative_gap': float(gaps.min()),
             'ids_differ': int(differ.sum()), 'ids_differ_outside_ties': int((differ.reshape(-1) & ~ties).sum()),
             'z_max_err': float(np.max(np.abs(np.asarray(z) - z_torch))), 'z_max': float(np.max(np.abs(z_torch))),
             'decoded_max_err': float(np.max(np.abs(np.asarray(decoded) - decoded_torch))),
             'decoded_max': float(np.max(np.abs(decoded_torch)))}
  print(figures)
  assert figures['ids_differ_outside_ties'] == 0, figures
  assert figures['distinct_ids'] > 10, figures  # the ids are a real test, not one entry everywhere
  assert figures['decoded_max_err'] < 2e-4, figures
  assert figures['z_max_err'] < 1e-4 * max(1.0, figures['z_max']), figures
  return model, params


def test_tiny_vqgan_matches_the_pytorch_layout():
  arch = vqgan.tiny_config()
  images = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
  check_parity(arch, images)


@pytest.mark.slow
def test_maskgit_vqgan_at_256px_matches_the_pytorch_layout_and_round_trips_bitwise():
  """The real architecture (ch 128, [1, 1, 2, 2, 4], 2 blocks, 1024 x 256): 168 tensors, 54,515,587 params."""
  arch = vqgan.maskgit_config()
  rng = np.random.default_rng(1)
  # Smooth images with detail (a coarse random field, upsampled, plus noise): codes vary over the grid.
  coarse = rng.random((2, 8, 8, 3), np.float32)
  images = np.clip(np.repeat(np.repeat(coarse, 32, 1), 32, 2) + 0.1 * rng.standard_normal((2, 256, 256, 3)), 0, 1)
  model, params = check_parity(arch, images.astype(np.float32))
  state_dict = to_numpy_sd(model)
  assert len(state_dict) == 168 and sum(v.size for v in state_dict.values()) == 54_515_587
  exported = engine.to_torch({'vqgan': params}, 'vqgan', {})
  assert list(exported) == list(state_dict)  # the PyTorch module's own key order
  for key, value in state_dict.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


# ---- export <-> import ----

def random_tiny_params(seed=0):
  config = tokenizer_config()
  shapes = jax.eval_shape(objectives.create(config).init, jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes), config


def test_export_then_import_is_bitwise_and_loads_strictly_into_the_pytorch_module(tmp_path):
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  params, config = random_tiny_params()
  state_dict = export.export_state_dict(params, config, 'vqgan')
  arch = vqgan.tiny_config()
  model = TorchVQModel(arch.ch, tuple(arch.ch_mult), arch.num_res_blocks, arch.embed_dim, arch.n_embed,
                       arch.num_groups)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  assert 'encoder.down.2.block.0.nin_shortcut.weight' in state_dict and 'decoder.up.2.upsample.conv.bias' in state_dict
  assert state_dict['encoder.conv_in.weight'].shape == (16, 3, 3, 3)  # OIHW
  # The released file: a torch-pickled checkpoint with a .ckpt name.
  path = tmp_path / 'vqgan_tiny.ckpt'
  torch.save({'state_dict': model.state_dict()}, path)  # pytorch-lightning's layout, as MAGE's loader reads it
  out = tmp_path / 'vqgan_tiny.msgpack'
  export.import_file(str(path), str(out), config, 'vqgan')
  back = export.load_init_params(str(out))
  assert set(back) == {'vqgan'}
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_import_names_what_does_not_fit():
  params, config = random_tiny_params()
  state_dict = engine.to_torch(params, 'vqgan', {})
  expected = jax.eval_shape(objectives.create(config).init, jax.random.key(0))
  broken = {k: v for k, v in state_dict.items() if k != 'quantize.embedding.weight'}
  broken['encoder.quant_conv.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(engine.ConversionError, match=r'(?s)quant_conv.*quantize\.embedding\.weight: missing'):
    engine.from_torch(broken, 'vqgan', expected, {})


def test_vqgan_rules_serve_mages_prefix():
  """MAGE's checkpoints hold the tokenizer under `vqgan.`: the same rules with another torch prefix."""
  rules = tables._vqgan('vqgan', 'vqgan')  # pylint: disable=protected-access
  assert ('vqgan/quantize/embedding', 'vqgan.quantize.embedding.weight', 'copy') in rules
  assert ('vqgan/encoder/down_4/block_{i}/nin_shortcut/kernel', 'vqgan.encoder.down.4.block.{i}.nin_shortcut.weight',
          'conv') in rules


# ---- the training objective ----

@functools.cache
def setup(**vq):
  config = tokenizer_config(16, **{**SMALL, **vq})
  objective = objectives.create(config)
  return config, objective, jax.jit(objective.init)(jax.random.key(0))


def digits(n=16, split='train', size=16):
  source = sources.embedded_digits(split, size)
  return jnp.asarray(source.images[:n] / 255.0, jnp.float32)


def test_codebook_usage_and_perplexity_on_a_hand_made_case():
  ids = jnp.array([[0, 0, 1, 1], [2, 2, 2, 2]])  # entries 0, 1, 2 of 8 with frequencies 1/4, 1/4, 1/2
  metrics = codebook_usage(ids, 8)
  assert float(metrics['codebook/usage']) == 3 / 8
  np.testing.assert_allclose(float(metrics['codebook/perplexity']), 2 ** 1.5, rtol=1e-6)  # exp(1.5 ln 2)
  assert float(codebook_usage(jnp.zeros((5,), jnp.int32), 8)['codebook/perplexity']) == 1.0


def test_quantiser_losses_and_the_straight_through_gradient():
  _, objective, params = setup()
  module, vq, images = objective.vqgan, params['vqgan'], digits(8)
  reconstruction_loss = lambda r: objective.reconstruction_loss(images, r)

  @jax.jit
  def compute():
    loss, metrics = objective.loss_fn(params, {'image': images}, jax.random.key(0))
    out = objective.forward(vq, images)
    # The reconstruction's gradient reaches the encoder through the straight-through codes: it is the encoder's
    # vjp of the decoder's gradient at z_q, and the codebook gets none of it.
    grads = jax.grad(lambda p: reconstruction_loss(objective.forward(p, images)['reconstruction']))(vq)
    at_zq = jax.grad(lambda zq: reconstruction_loss(module.apply({'params': vq}, zq, method=module.decode_latents)[0]))(
        out['z_q'])
    encode = lambda enc: module.apply({'params': {**vq, 'encoder': enc}}, images, method=module.encode_latents)
    return loss, metrics, out, grads, jax.vjp(encode, vq['encoder'])[1](at_zq)[0]

  loss, metrics, out, grads, expected = compute()
  codebook, z = np.asarray(vq['quantize']['embedding']), np.asarray(out['z'])
  ids = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(out['ids'], ids)
  np.testing.assert_array_equal(out['z_q'], codebook[ids])
  sq = float(np.mean((z - codebook[ids]) ** 2))
  np.testing.assert_allclose(float(metrics['loss/commitment']), sq, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss/codebook']), sq, rtol=1e-5)
  rec = np.asarray(out['reconstruction']) - np.asarray(images)
  np.testing.assert_allclose(float(loss), np.mean(np.abs(rec)) + np.mean(rec**2) + 1.25 * sq, rtol=1e-5)
  assert not np.any(np.asarray(grads['quantize']['embedding']))
  scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(expected))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale), grads['encoder'],
               expected)
  assert scale > 0


def trainer_for(**vq):
  config = tokenizer_config(16, **{**SMALL, **vq})
  config.train.update(batch_size=16, num_steps=12, warmup_epochs=0, blr=2e-3 * 16)  # lr 2e-3
  config.data.eval_split = ''
  return train.Trainer(config, devices=jax.devices()[:1])


def run_steps(trainer, steps):
  """(initial state on the host, final state, each step's metrics, the first batch)."""
  state, history, batches = trainer.init_state(), [], []
  start = jax.device_get(state)
  for local_batch in trainer.loader.iterate(0, steps, prefetch=0):
    state, metrics = trainer.train_step(state, sharding.global_batch(local_batch, trainer.mesh))
    history.append(jax.device_get(metrics))
    batches.append(local_batch)
  return start, state, history, batches[0]


def test_training_steps_lower_the_loss():
  _, _, history, _ = run_steps(trainer_for(), 10)
  losses, l2 = [h['loss'] for h in history], [h['loss/l2'] for h in history]
  print('losses', np.round(losses, 4), 'l2', np.round(l2, 4))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]) and np.mean(l2[-3:]) < 0.5 * l2[0], (losses, l2)
  assert all(0 < h['codebook/usage'] <= 1 and 1 <= h['codebook/perplexity'] <= 32 for h in history)


@pytest.mark.slow
def test_joint_run_with_ema_codebook_and_a_delayed_discriminator():
  """One 'joint' run with both kinds of state: the EMA codebook moves by taming's rule, and both players switch
  on at disc_start."""
  trainer = trainer_for(ema=True, adv_weight=0.5, disc_ch=8, disc_layers=2, update_scheme='joint', disc_start=2)
  objective = trainer.objective
  assert 'quantize' not in jax.eval_shape(objective.init, jax.random.key(0))['vqgan']
  start, state, history, batch = run_steps(trainer, 3)
  assert [h['gan/active'] for h in history] == [0.0, 0.0, 1.0]
  assert int(state['collections']['progress']['micro_steps']) == 3
  assert all(np.isfinite(h['loss']) and np.isfinite(h['loss/discriminator']) for h in history)
  assert 'loss/codebook' not in history[0]
  disc_kernel = lambda p: np.asarray(p['discriminator']['conv_0']['kernel'])
  assert not np.allclose(disc_kernel(start['params']), disc_kernel(jax.device_get(state['params'])))

  # taming's EMAVectorQuantizer by hand for the first step: decayed counts and sums of the codes assigned to
  # each entry, the codebook = sums / Laplace-smoothed counts.
  before = start['collections']['ema']
  out = jax.jit(objective.forward)(objective.tokenizer_params(start['params'], start['collections']), batch['image'])
  ids, z = np.asarray(out['ids']).reshape(-1), np.asarray(out['z'], np.float64).reshape(-1, 8)
  cluster = 0.01 * np.bincount(ids, minlength=32)
  sums = np.zeros((32, 8))
  np.add.at(sums, ids, z)
  embed_avg = 0.99 * before['embed_avg'] + 0.01 * sums
  smoothed = (cluster + 1e-5) / (cluster.sum() + 32e-5) * cluster.sum()
  first = ema_update(before, out['z'], out['ids'], 0.99, 1e-5)
  np.testing.assert_allclose(first['cluster_size'], cluster, rtol=1e-6)
  np.testing.assert_allclose(first['embed_avg'], embed_avg, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(first['codebook'], embed_avg / smoothed[:, None], rtol=1e-4)
  after = jax.device_get(state['collections']['ema'])
  assert np.any(after['codebook'] != before['codebook'])
  np.testing.assert_allclose(after['cluster_size'].sum(), (1 - 0.99**3) * ids.size, rtol=1e-5)  # 3 batches of codes


def adversarial_setup(**vq):
  config, objective, params = setup(adv_weight=0.5, disc_ch=8, disc_layers=2, **vq)
  return config, objective, params, {'image': digits(4)}


def test_joint_adversarial_routes_each_players_term_to_it_only():
  _, objective, params, batch = adversarial_setup(update_scheme='joint')
  images = batch['image']

  def terms(p):
    vq_terms, _, out = objective.tokenizer_terms(p['vqgan'], p['discriminator'], images, 1.0)
    disc_terms, _ = objective.discriminator_terms(p['discriminator'], images, out['reconstruction'], 1.0)
    return {'adversarial': vq_terms['adversarial'], 'discriminator': disc_terms['discriminator']}

  grads = jax.jit(jax.jacrev(terms))(params)
  zero = lambda tree: all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))
  assert zero(grads['adversarial']['discriminator']) and zero(grads['discriminator']['vqgan'])
  assert np.any(np.asarray(grads['adversarial']['vqgan']['decoder']['conv_out']['kernel']))
  assert np.any(np.asarray(grads['adversarial']['vqgan']['encoder']['conv_in']['kernel']))
  assert np.any(np.asarray(grads['discriminator']['discriminator']['conv_0']['kernel']))


def test_adaptive_weight_is_tamings_gradient_norm_ratio_at_conv_out():
  _, objective, params, batch = adversarial_setup()
  images, vq = batch['image'], params['vqgan']

  def losses(kernel):
    conv_out = {**vq['decoder']['conv_out'], 'kernel': kernel}
    r = objective.forward({**vq, 'decoder': {**vq['decoder'], 'conv_out': conv_out}}, images)['reconstruction']
    return objective.reconstruction_loss(images, r), -jnp.mean(objective.discriminate(params['discriminator'], r))

  weight = jax.jit(lambda: objective.tokenizer_terms(vq, params['discriminator'], images, 1.0)[1]['gan/adv_weight'])()
  rec_grad, adv_grad = jax.jit(jax.jacrev(losses))(vq['decoder']['conv_out']['kernel'])  # hinge's generator loss
  expected = 0.5 * np.clip(np.linalg.norm(rec_grad) / (np.linalg.norm(adv_grad) + 1e-4), 0, 1e4)
  np.testing.assert_allclose(float(weight), expected, rtol=1e-4)


def test_alternating_declares_a_tokenizer_then_a_discriminator_update():
  _, objective, params, _ = adversarial_setup()
  assert [p.name for p in objective.update_phases()] == ['vqgan', 'discriminator']
  owned = objective.trainable(params)
  assert isinstance(owned, PhaseTrainable)
  assert {phase: {name for name, tree in masks.items() if all(jax.tree.leaves(tree))}
          for phase, masks in owned.items()} == {'vqgan': {'vqgan'}, 'discriminator': {'discriminator'}}


@pytest.mark.slow
def test_alternating_training_moves_both_players():
  trainer = trainer_for(adv_weight=0.5, disc_ch=8, disc_layers=2, adv_weight_mode='constant',
                        disc_loss='non_saturating')
  start, state, history, _ = run_steps(trainer, 2)
  params = jax.device_get(state['params'])
  for group, leaf in (('vqgan', lambda p: p['encoder']['conv_in']['kernel']),
                      ('discriminator', lambda p: p['conv_0']['kernel'])):
    assert not np.allclose(leaf(start['params'][group]), leaf(params[group])), group
  assert {'loss/phase_vqgan', 'loss/phase_discriminator', 'gan/disc_acc'} <= set(history[-1])
  assert all(np.isfinite(v) for h in history for v in h.values())


@pytest.mark.parametrize('field,value,message', [
    ('data.mean', (0.485, 0.456, 0.406), r'\[0, 1\] pixels'),
    ('vqgan.num_groups', 7, 'num_groups=7 must divide'),
    ('vqgan.l2_weight', -1.0, 'loss weights'),
    ('vqgan.disc_loss', 'wgan', 'disc_loss'),
    ('vqgan.ema', True, 'update_scheme=joint'),
])
def test_validate_names_the_bad_vqgan_field(field, value, message):
  config = load_config('vqgan_tiny_cpu')
  config.vqgan.adv_weight = 0.1
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


# ---- configs and the shipped tokenizer ----

def test_imagenet_config_is_maskgits_tokenizer():
  config = load_config('vqgan_imagenet')
  config_lib.validate(config)
  objective = objectives.create(config)
  shapes = jax.eval_shape(objective.init, jax.random.key(0))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['vqgan'])) == 54_515_587
  assert config.data.img_size == 256 and config.vqgan.beta == 0.25 and config.vqgan.n_embed == 1024
  ids = jax.eval_shape(lambda p, x: objective.vqgan.apply({'params': p}, x, method=vqgan.VQGAN.encode),
                       shapes['vqgan'], jnp.zeros((1, 256, 256, 3)))
  assert ids.shape == (1, 256)


def test_shipped_tiny_tokenizer_reconstructs_held_out_digits_better_than_a_random_one():
  """The asset loads as MAGE's frozen tokenizer does; the reconstruction evaluator's figures on the 300 held-out
  digits, checked against a direct computation, for it and for a random tokenizer of the same sizes."""
  config = load_config('vqgan_tiny_cpu')
  config.eval.batch_size = 300  # the whole split in one batch
  shipped = frozen.read(vqgan.frozen_network('mage.tokenizer', vqgan.tiny_config()),
                        {'mage': {'tokenizer': vqgan.TINY_DIGITS_TOKENIZER}})
  objective = objectives.create(config)
  random = jax.jit(objective.init)(jax.random.key(0))['vqgan']
  mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
  held_out = data.eval_source(config)
  evaluator = ReconstructionEvaluator(config, objective, None, held_out, mesh)
  figures = {name: evaluator({'vqgan': p}) for name, p in (('shipped', shipped), ('random', random))}
  print(figures)
  batch = next(iter(loader.eval_batches(held_out, evaluator.transform, 300)))
  reconstruction, ids = evaluator.reconstruct({'vqgan': shipped}, batch['image'])
  np.testing.assert_allclose(figures['shipped']['recon/mse'], np.mean((reconstruction - batch['image']) ** 2),
                             rtol=1e-5)
  assert ids.shape == (300, 64)
  assert figures['shipped']['codebook/usage'] == len(np.unique(ids)) / 128
  assert figures['shipped']['recon/mse'] < 0.05 * figures['random']['recon/mse']
  assert figures['shipped']['codebook/usage'] > 0.5


@pytest.mark.slow
def test_tiny_config_trains_from_the_command_line(tmp_path):
  workdir = tmp_path / 'vq'
  result = run_main('--config=configs/vqgan_tiny_cpu.py', f'--workdir={workdir}', '--config.train.num_steps=8',
                    '--config.log.every_steps=4', check=True)
  assert 'recon/mse on digits/test: random init' in result.stdout
  assert 'codebook/usage on digits/test' in result.stdout
