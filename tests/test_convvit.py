"""ConvMAE's ConvViT: parity with a PyTorch ConvMAE written here from the reference's layout (loaded through the
'convmae-official' and 'convvit-finetuned' export tables), no leakage from masked patches, the configs."""
import functools
from unittest import mock

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

from test_export import max_err, nchw, random_params, to_torch_sd  # noqa: E402  (after the skips)
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402

from mae_jax import config as config_lib  # noqa: E402
from mae_jax import export, objectives, tasks  # noqa: E402
from mae_jax.export import tables  # noqa: E402
from mae_jax.models import convvit  # noqa: E402
from mae_jax.models.patchify import patchify  # noqa: E402
from mae_jax.objectives.mae import reconstruction_loss  # noqa: E402

tnn = torch.nn
TorchLayerNorm6 = functools.partial(tnn.LayerNorm, eps=1e-6)  # the reference's norm_layer; its CBlocks use 1e-5
SIZES = {'pico/4': ('convpico/4', 32), 'pico/16': ('convpico/16', 64)}  # stage patches 1/2/2 and ConvMAE-B's 4/2/2


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


# ---- the PyTorch side, after Alpha-VL/ConvMAE models_convmae.py / vision_transformer.py ----

class TorchPatchEmbed(tnn.Module):
  def __init__(self, patch, cin, cout):
    super().__init__()
    self.proj, self.norm, self.act = tnn.Conv2d(cin, cout, patch, stride=patch), tnn.LayerNorm(cout), tnn.GELU()

  def forward(self, x):
    return self.act(self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class TorchCMlp(tnn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = tnn.Conv2d(dim, hidden, 1), tnn.GELU(), tnn.Conv2d(hidden, dim, 1)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class TorchCBlock(tnn.Module):
  def __init__(self, dim, mlp_ratio):
    super().__init__()
    self.norm1, self.norm2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
    self.conv1, self.conv2 = tnn.Conv2d(dim, dim, 1), tnn.Conv2d(dim, dim, 1)
    self.attn = tnn.Conv2d(dim, dim, 5, padding=2, groups=dim)
    self.mlp = TorchCMlp(dim, int(dim * mlp_ratio))

  def forward(self, x, mask=None):
    norm = lambda layer, x: layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    y = self.conv1(norm(self.norm1, x))
    x = x + self.conv2(self.attn(y if mask is None else mask * y))
    return x + self.mlp(norm(self.norm2, x))


class TorchConvMAE(tnn.Module):
  """MaskedAutoencoderConvViT (with `cls`, the v2 cls token as we place it), or with `finetune` models_convvit's
  ConvViT(global_pool=True): no masking, no fusion, learned pos_embed, fc_norm and head."""

  def __init__(self, enc, dec=None, finetune=False, num_classes=0):
    super().__init__()
    (w1, w2, w3), (d1, d2, d3), (p1, p2, p3) = enc.widths, enc.depths, enc.stage_patches
    self.prefix, self.grid, self.finetune = enc.num_prefix_tokens, enc.grid_size[0], finetune
    self.patch_embed1, self.patch_embed2 = TorchPatchEmbed(p1, 3, w1), TorchPatchEmbed(p2, w1, w2)
    self.patch_embed3, self.patch_embed4 = TorchPatchEmbed(p3, w2, w3), tnn.Linear(w3, w3)
    self.pos_embed = tnn.Parameter(torch.zeros(1, self.prefix + enc.num_patches, w3), requires_grad=finetune)
    if self.prefix:
      self.cls_token = tnn.Parameter(torch.zeros(1, 1, w3))
    self.blocks1 = tnn.ModuleList([TorchCBlock(w1, enc.mlp_ratio) for _ in range(d1)])
    self.blocks2 = tnn.ModuleList([TorchCBlock(w2, enc.mlp_ratio) for _ in range(d2)])
    self.blocks3 = tnn.ModuleList([TimmBlock(w3, enc.num_heads, enc.mlp_ratio, qkv_bias=True,
                                             norm_layer=TorchLayerNorm6) for _ in range(d3)])
    if finetune:
      self.fc_norm, self.head = TorchLayerNorm6(w3), tnn.Linear(w3, num_classes)
      return
    self.stage1_output_decode = tnn.Conv2d(w1, w3, p2 * p3, stride=p2 * p3)
    self.stage2_output_decode = tnn.Conv2d(w2, w3, p3, stride=p3)
    self.norm = TorchLayerNorm6(w3)
    self.decoder_embed = tnn.Linear(w3, dec.width)
    self.mask_token = tnn.Parameter(torch.zeros(1, 1, dec.width))
    self.decoder_pos_embed = tnn.Parameter(torch.zeros(1, self.prefix + enc.num_patches, dec.width), requires_grad=False)
    self.decoder_blocks = tnn.ModuleList([TimmBlock(dec.width, dec.num_heads, dec.mlp_ratio, qkv_bias=True,
                                                    norm_layer=TorchLayerNorm6) for _ in range(dec.depth)])
    self.decoder_norm = TorchLayerNorm6(dec.width)
    self.decoder_pred = tnn.Linear(dec.width, dec.out_dim)

  def upsampled(self, mask, f):
    """The reference's mask_for_patch{1,2}: each grid cell repeated as an f x f block."""
    g, n = self.grid, mask.shape[0]
    return (mask.reshape(-1, g, g).unsqueeze(-1).repeat(1, 1, 1, f * f).reshape(-1, g, g, f, f)
            .permute(0, 1, 3, 2, 4).reshape(n, g * f, g * f).unsqueeze(1))

  def forward_encoder(self, x, ids_keep=None, mask=None):
    gather = lambda t: t if ids_keep is None else torch.gather(t, 1, ids_keep[..., None].repeat(1, 1, t.shape[-1]))
    x = self.patch_embed1(x)
    visible1 = None if mask is None else 1 - self.upsampled(mask, x.shape[-1] // self.grid)
    for blk in self.blocks1:
      x = blk(x, visible1)
    stage1 = x
    x = self.patch_embed2(x)
    visible2 = None if mask is None else 1 - self.upsampled(mask, x.shape[-1] // self.grid)
    for blk in self.blocks2:
      x = blk(x, visible2)
    stage2 = x
    x = self.patch_embed4(self.patch_embed3(x).flatten(2).permute(0, 2, 1)) + self.pos_embed[:, self.prefix:]
    x = gather(x)
    if self.prefix:
      x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
    for blk in self.blocks3:
      x = blk(x)
    if self.finetune:
      return {'stage1': stage1, 'stage2': stage2, 'logits': self.head(self.fc_norm(x[:, self.prefix:].mean(1)))}
    fused = (self.stage1_output_decode(stage1).flatten(2).permute(0, 2, 1)
             + self.stage2_output_decode(stage2).flatten(2).permute(0, 2, 1))
    x = torch.cat([x[:, :self.prefix], x[:, self.prefix:] + gather(fused)], dim=1)
    return {'stage1': stage1, 'stage2': stage2, 'tokens': self.norm(x)}

  def forward_decoder(self, x, ids_restore):
    x = self.decoder_embed(x)
    patches = torch.cat([x[:, self.prefix:], self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + self.prefix
                                                                    - x.shape[1], 1)], dim=1)
    patches = torch.gather(patches, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :self.prefix], patches], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, self.prefix:]

  def forward(self, images, noise, mask_ratio, norm_pix_loss):
    """The reference's random_masking of `noise`, forward_encoder/decoder and forward_loss (p = the total stride)."""
    n, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    out = self.forward_encoder(images, ids_shuffle[:, :keep], mask)
    pred = self.forward_decoder(out['tokens'], ids_restore)
    p = images.shape[-1] // self.grid
    target = torch.einsum('nchpwq->nhwpqc', images.reshape(n, 3, self.grid, p, self.grid, p)).reshape(n, length, -1)
    if norm_pix_loss:
      target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    return out, float(loss), mask


# ---- the JAX side ----

def make_config(size, cls_token=False, norm_pix_loss=True):
  variant, img_size = SIZES[size]
  c = config_lib.base_config()
  c.model.variant = variant
  c.model.convvit.cls_token = cls_token
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.data.img_size = img_size
  c.mae.norm_pix_loss = norm_pix_loss
  return c


@functools.cache
def model_and_params(size, cls_token=False):
  config = make_config(size, cls_token)
  objective = objectives.create(config)
  return config, objective, random_params(objective)


def images_and_noise(objective, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, objective.img_size, objective.img_size, 3), np.float32)
  return images, rng.random((batch, objective.encoder.num_patches), np.float32)


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


# ---- 1. parity ----

@pytest.mark.parametrize('cls_token', [False, True])
@pytest.mark.parametrize('size', SIZES)
def test_pretraining_matches_torch_convmae(size, cls_token):
  """Stage maps, encoder tokens and the loss of one mask against the PyTorch model loaded from our export."""
  config, objective, params = model_and_params(size, cls_token)
  model = TorchConvMAE(objective.encoder, objective.decoder).eval()
  model.load_state_dict(to_torch_sd(export.export_state_dict(params, config, 'convmae-official')), strict=True)
  images, noise = images_and_noise(objective)
  with torch.no_grad():
    want, want_loss, want_mask = model(nchw(images), torch.from_numpy(noise), config.mae.mask_ratio, True)
  m = objective.random_masking(jnp.asarray(noise))
  got = objective.encoder.apply({'params': params['encoder']}, images, m.ids_keep)
  pred, mask = objective.forward(params, images, noise)
  loss = float(reconstruction_loss(pred, patchify(images, objective.patch_size), mask, True))
  errs = {k: max_err(got[k], nhwc(want[k]) if k.startswith('stage') else want[k]) for k in ('stage1', 'stage2', 'tokens')}
  print(f'{size} cls={cls_token}: {errs}, loss {loss:.6f} |d| {abs(loss - want_loss):.2e}')
  np.testing.assert_array_equal(mask, want_mask.numpy())
  assert max(errs.values()) < 1e-4 and abs(loss - want_loss) < 1e-5


def test_finetuned_classifier_matches_torch_convvit():
  """Fine-tuning's model (no mask, no fusion, gap + fc_norm, learned table from the pretrained one, head) through
  the 'convvit-finetuned' table, warm-started from a pretraining run's params."""
  config = load_config('convmae_tiny_cpu')
  config.model.variant = 'convpico/16'
  config.data.img_size = 64
  tasks.finetune_recipe(config, epochs=1, blr=1e-3, layer_decay=0.75, drop_path=0.1, batch_size=8)
  classifier = tasks.create(config).build_model(num_classes=10)
  pretrained = model_and_params('pico/16')[2]
  fresh = random_params(classifier, seed=1)
  source = classifier.warm_start_source(pretrained, make_config('pico/16'))['encoder']
  assert 'stage1_output_decode' not in fresh['encoder'] and 'fc_norm' in fresh['encoder']
  params = {'encoder': {k: source.get(k, v) if k not in ('fc_norm',) else v for k, v in fresh['encoder'].items()},
            'head': fresh['head']}
  np.testing.assert_array_equal(params['encoder']['pos_embed'], tables.fixed_tables(model_and_params('pico/16')[1])
                                ['encoder/pos_embed'])  # the learned table starts as the pretrained fixed one
  model = TorchConvMAE(classifier.encoder, finetune=True, num_classes=10).eval()
  model.load_state_dict(to_torch_sd(export.export_state_dict(params, config, 'convvit-finetuned')), strict=True)
  images, _ = images_and_noise(classifier)
  with torch.no_grad():
    want = model.forward_encoder(nchw(images))['logits']
  got = classifier.predict(params, images)
  assert got.shape == (2, 10) and max_err(got, want) < 1e-4


@pytest.mark.parametrize('fmt', ['convmae-official', 'convvit-finetuned'])
def test_export_import_round_trip_is_bitwise(tmp_path, fmt):
  if fmt == 'convmae-official':
    config, _, params = model_and_params('pico/4')
  else:
    config = make_config('pico/4')
    tasks.finetune_recipe(config, epochs=1, blr=1e-3, layer_decay=0.75, drop_path=0.1)
    params = random_params(tasks.create(config).build_model(num_classes=10))
  path = tmp_path / 'convmae.pth'
  export.save(export.export_state_dict(params, config, fmt), path, fmt)
  back = export.import_state_dict(export.load_state_dict(path), config, fmt)
  want = flax.traverse_util.flatten_dict({k: params[k] for k in back})
  got = flax.traverse_util.flatten_dict(back)
  assert got.keys() == want.keys()
  assert all(got[k].tobytes() == np.asarray(want[k]).tobytes() for k in want)


def test_convmae_base_has_the_reference_shapes():
  """ConvViT-B's state_dict shapes (torch OIHW) of models_convmae.convmae_convvit_base_patch16."""
  config = load_config('convmae_base')
  config_lib.validate(config)
  objective = objectives.create(config)
  flat = flax.traverse_util.flatten_dict(jax.eval_shape(objective.init, jax.random.key(0)), sep='/')
  torch_shape = lambda path: tables.KINDS['conv'][0](np.zeros(flat[path].shape)).shape
  assert torch_shape('encoder/patch_embed1/proj/kernel') == (256, 3, 4, 4)
  assert torch_shape('encoder/patch_embed3/proj/kernel') == (768, 384, 2, 2)
  assert torch_shape('encoder/blocks1_1/attn/kernel') == (256, 1, 5, 5)
  assert torch_shape('encoder/blocks2_1/mlp/fc1/kernel') == (1536, 384, 1, 1)
  assert torch_shape('encoder/stage1_output_decode/kernel') == (768, 256, 4, 4)
  assert torch_shape('encoder/stage2_output_decode/kernel') == (768, 384, 2, 2)
  assert flat['encoder/blocks3_10/attn/qkv/kernel'].shape == (768, 2304) and 'encoder/blocks3_11/norm1/scale' not in flat
  assert flat['decoder/decoder_pred/kernel'].shape == (512, 768) and 'encoder/cls_token' not in flat
  assert objective.encoder.grid_size == (14, 14) and objective.decoder.cls_token is False


# ---- 2. no leakage ----

@pytest.mark.parametrize('cls_token', [False, True])
def test_knn_features_pool_every_patch_token_and_no_cls(cls_token):
  _, objective, params = model_and_params('pico/16', cls_token)
  images, _ = images_and_noise(objective)
  tokens = objective.encoder.apply({'params': params['encoder']}, images)['tokens']
  assert tokens.shape[1] == objective.encoder.num_patches + cls_token
  np.testing.assert_allclose(objective.features(params, images), tokens[:, int(cls_token):].mean(axis=1), atol=1e-6)


def test_masked_patch_pixels_reach_no_kept_output():
  """With the mask fixed, new pixels in one masked 16x16 patch change no kept stage position, no fused or final
  token (jitted); the same change in a kept patch, or with the depthwise convs unmasked, does."""
  config, objective, params = model_and_params('pico/16')
  enc = objective.encoder
  images, noise = images_and_noise(objective, batch=1)
  m = objective.random_masking(jnp.asarray(noise))
  forward = jax.jit(lambda x: enc.apply({'params': params['encoder']}, x, m.ids_keep))
  grid, patch = enc.grid_size[0], enc.patch_size

  def perturbed(index):
    row, col = divmod(int(index), grid)
    out = images.copy()
    out[:, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 3.0
    return out

  kept = int(m.ids_keep[0, 0])
  neighbours = [kept + d for d in (-grid, grid) if 0 <= kept + d < grid * grid]
  neighbours += [kept + d for d in (-1, 1) if (kept + d) // grid == kept // grid]
  masked = next(i for i in neighbours if m.mask[0, i])  # next to a kept patch: the depthwise convs reach it
  base, changed = forward(images), forward(perturbed(masked))
  for stage in ('stage1', 'stage2'):
    visible = np.asarray(convvit.visible_map(m.ids_keep, enc.grid_size, base[stage].shape[1] // grid, jnp.float32))
    assert visible.sum() < visible.size  # some positions are masked
    np.testing.assert_array_equal(np.asarray(base[stage]) * visible, np.asarray(changed[stage]) * visible)
  for key in ('tokens', 'pre_norm', 'blocks'):
    np.testing.assert_array_equal(jax.tree.leaves(base[key]), jax.tree.leaves(changed[key]), err_msg=key)
  assert max_err(forward(perturbed(kept))['tokens'], base['tokens']) > 1e-3
  ones = lambda ids, grid_size, factor, dtype: jnp.ones((1, grid_size[0] * factor, grid_size[1] * factor, 1), dtype)
  with mock.patch.object(convvit, 'visible_map', ones):
    unmasked = jax.jit(lambda x: enc.apply({'params': params['encoder']}, x, m.ids_keep))
    assert max_err(unmasked(perturbed(masked))['tokens'], unmasked(images)['tokens']) > 1e-5


# ---- 3. the objectives on it ----

@pytest.mark.slow  # two ConvViT train steps take minutes to compile on XLA:CPU
def test_tiny_configs_train_a_step(tmp_path):
  """ConvMAE and MR-MCMAE (a random nano/4 teacher of the same 8x8 grid) from their tiny configs: finite losses,
  every trainable param moved by the gradient."""
  from test_mr_mae import objective_and_params, write_teacher  # pylint: disable=g-import-not-at-top
  for name in ('convmae_tiny_cpu', 'mr_mcmae_tiny_cpu'):
    config = load_config(name)
    if name.startswith('mr_'):
      config.mr_mae.teachers.mae.init_from = write_teacher(tmp_path / 't.msgpack', 'vit', 'nano/4', 32)
    objective, params, frozen = objective_and_params(config)
    assert ('cls_token' in params['encoder']) == name.startswith('mr_')
    images = jnp.asarray(images_and_noise(objective, batch=4)[0])
    batch = {'image': images, 'example_key': jax.random.key_data(jax.random.split(jax.random.key(1), 4))}
    grads, metrics = jax.jit(jax.grad(lambda p: objective.loss_fn({**p, **frozen}, batch, jax.random.key(2)),
                                      has_aux=True))(params)
    print(name, {k: float(v) for k, v in metrics.items()})
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_variant_errors_name_the_field():
  config = make_config('pico/4')
  config.model.variant = 'convpico/6'
  with pytest.raises(config_lib.ConfigError, match='multiple of 4'):
    config_lib.validate(config)
  assert convvit.encoder_dims('convB/16') == dict(patch_size=16, width=768, depth=11, num_heads=12)
