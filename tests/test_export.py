"""PyTorch interop: exports load strictly into timm / HF transformers and give the JAX model's numbers;
files round-trip bitwise; unsafe pickles are refused; nothing is dropped silently."""
import functools
import re

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import load_config, run_cli

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

from mae_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from mae_jax import objectives
from mae_jax import export
from mae_jax.export import tables
from mae_jax.models.patchify import patchify
from mae_jax.objectives.mae import reconstruction_loss

SIZES = {  # variant, img_size, decoder (width, depth, heads)
    'tiny': ('pico/4', 32, (32, 1, 2)),
    'B/16': ('B/16', 224, (512, 8, 16)),
}
TORCH_FORMATS = ('mae-official', 'timm-vit', 'timm-vit-avg')
SIZE_PARAMS = [pytest.param(s, marks=[pytest.mark.slow] if s == 'B/16' else []) for s in SIZES]  # B/16: slow


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def make_config(size, norm_pix_loss=True, img_size=None):
  variant, default_img_size, (width, depth, heads) = SIZES[size]
  c = config_lib.base_config()
  c.model.variant = variant
  c.data.img_size = img_size or default_img_size
  c.model.decoder.update(width=width, depth=depth, num_heads=heads)
  c.mae.norm_pix_loss = norm_pix_loss
  return c


def random_params(objective, seed=0):
  """Every param random (biases and norms too, unlike a fresh init), and cheap even for ViT-B."""
  shapes = flax.traverse_util.flatten_dict(jax.eval_shape(objective.init, jax.random.key(0)), sep='/')
  rng = np.random.default_rng(seed)
  params = {}
  for path, s in shapes.items():
    noise = rng.standard_normal(s.shape, np.float32)
    params[path] = 1 + 0.1 * noise if path.endswith('scale') else 0.02 * noise
  return flax.traverse_util.unflatten_dict(params, sep='/')


@functools.cache
def model_and_params(size, norm_pix_loss=True):
  config = make_config(size, norm_pix_loss)
  objective = objectives.create(config)
  return config, objective, random_params(objective)


def images_and_noise(config, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  size, patch = config.data.img_size, int(config.model.variant.split('/')[1])
  images = rng.standard_normal((batch, size, size, 3), np.float32)
  return images, rng.random((batch, (size // patch) ** 2), np.float32)


def nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def to_torch_sd(state_dict):
  return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def jax_features(objective, params, images, pool):
  """What timm computes: (forward_features, pooled). 'token': norm(x), norm(x)[:, 0]; 'avg': x before the
  final norm, and that norm (exported as fc_norm) applied to the mean of the patch tokens."""
  out = objective.encoder.apply({'params': params['encoder']}, images)
  if pool == 'token':
    return out['tokens'], out['tokens'][:, 0]
  last = out['pre_norm']
  return last, nn.LayerNorm(epsilon=1e-6).apply({'params': params['encoder']['norm']}, last[:, 1:].mean(1))


def timm_vit(config, pool, num_classes=0, img_size=None):
  enc = objectives.create(config).encoder
  kw = dict(num_classes=num_classes, global_pool=pool, fc_norm=pool == 'avg')
  if (enc.width, enc.depth, enc.patch_size, enc.img_size) == (768, 12, 16, 224) and not img_size:
    return timm.create_model('vit_base_patch16_224', pretrained=False, **kw).eval()
  return timm.models.vision_transformer.VisionTransformer(
      img_size=img_size or enc.img_size, patch_size=enc.patch_size, embed_dim=enc.width, depth=enc.depth,
      num_heads=enc.num_heads, **kw).eval()


def hf_vitmae(config):
  objective = objectives.create(config)
  enc, dec = objective.encoder, objective.decoder
  hf_config = transformers.ViTMAEConfig(
      hidden_size=enc.width, num_hidden_layers=enc.depth, num_attention_heads=enc.num_heads,
      intermediate_size=4 * enc.width, image_size=enc.img_size, patch_size=enc.patch_size,
      decoder_hidden_size=dec.width, decoder_num_hidden_layers=dec.depth, decoder_num_attention_heads=dec.num_heads,
      decoder_intermediate_size=4 * dec.width, layer_norm_eps=1e-6, mask_ratio=config.mae.mask_ratio,
      norm_pix_loss=config.mae.norm_pix_loss, hidden_act='gelu')
  return transformers.ViTMAEForPreTraining(hf_config).eval()


# Official MAE keys <-> HF transformers 5.x ViTMAE keys (HF splits the fused qkv into q/k/v_proj).
HF_PREFIXES = [('cls_token', 'vit.embeddings.cls_token'), ('pos_embed', 'vit.embeddings.position_embeddings'),
               ('patch_embed.proj.', 'vit.embeddings.patch_embeddings.projection.'), ('norm.', 'vit.layernorm.'),
               ('mask_token', 'decoder.mask_token'), ('decoder_pos_embed', 'decoder.decoder_pos_embed'),
               ('decoder_embed.', 'decoder.decoder_embed.'), ('decoder_norm.', 'decoder.decoder_norm.'),
               ('decoder_pred.', 'decoder.decoder_pred.'), ('blocks.', 'vit.layers.'),
               ('decoder_blocks.', 'decoder.decoder_layers.')]
HF_BLOCK = [('norm1.', 'layernorm_before.'), ('norm2.', 'layernorm_after.'), ('attn.proj.', 'attention.o_proj.'),
            ('mlp.', 'mlp.')]
QKV = ('q_proj', 'k_proj', 'v_proj')


def _rename(key, pairs):
  for a, b in pairs:
    if key.startswith(a):
      return b + key[len(a):]
  raise KeyError(key)


def official_to_hf(sd):
  out = {}
  for key, value in sd.items():
    m = re.match(r'((?:decoder_)?blocks\.\d+\.)(.*)', key)
    if not m:
      out[_rename(key, HF_PREFIXES)] = value
    elif m[2].startswith('attn.qkv.'):
      for name, part in zip(QKV, np.split(value, 3)):
        out[f'{_rename(m[1], HF_PREFIXES)}attention.{name}.{m[2].split(".")[-1]}'] = part
    else:
      out[_rename(m[1], HF_PREFIXES) + _rename(m[2], HF_BLOCK)] = value
  return out


def hf_to_official(sd):
  back = [(b, a) for a, b in HF_PREFIXES]
  out = {}
  for key, value in sd.items():
    m = re.match(r'((?:vit\.layers|decoder\.decoder_layers)\.\d+\.)(.*)', key)
    if not m:
      out[_rename(key, back)] = value
    elif m[2].startswith('attention.q_proj.'):
      kind = m[2].split('.')[-1]
      out[f'{_rename(m[1], back)}attn.qkv.{kind}'] = np.concatenate([sd[f'{m[1]}attention.{n}.{kind}'] for n in QKV])
    elif not m[2].startswith(('attention.k_proj.', 'attention.v_proj.')):
      out[_rename(m[1], back) + _rename(m[2], [(b, a) for a, b in HF_BLOCK])] = value
  return out


def hf_outputs(model, images, noise):
  with torch.no_grad():
    out = model(nchw(images), noise=torch.from_numpy(noise))
  return float(out.loss), out.logits.numpy(), out.mask.numpy()


def jax_outputs(objective, params, images, noise):
  pred, mask = objective.forward(params, images, noise)
  loss = reconstruction_loss(pred, patchify(images, objective.patch_size), mask, objective.norm_pix_loss)
  return float(loss), np.asarray(pred), np.asarray(mask)


# 1. timm ViT.
@pytest.mark.parametrize('size', SIZE_PARAMS)
@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_timm_vit_matches_jax_encoder(size, pool):
  config, objective, params = model_and_params(size)
  fmt = 'timm-vit' if pool == 'token' else 'timm-vit-avg'
  model = timm_vit(config, pool)
  model.load_state_dict(to_torch_sd(export.export_state_dict(params, config, fmt)), strict=True)
  images, _ = images_and_noise(config)
  with torch.no_grad():
    tokens = model.forward_features(nchw(images))
    pooled = model.forward_head(tokens, pre_logits=True)
  want_tokens, want_pooled = jax_features(objective, params, images, pool)
  errs = max_err(tokens, want_tokens), max_err(pooled, want_pooled)
  print(f'timm {size} {pool}: max |d| features {errs[0]:.2e}, pooled {errs[1]:.2e}')
  assert max(errs) < 1e-4


def test_timm_head_and_resolution():
  """A zero head of num_classes; another img_size resizes pos_embed exactly like timm's own loader."""
  config, objective, params = model_and_params('tiny')
  sd = export.export_state_dict(params, config, 'timm-vit-avg', img_size=64, num_classes=10)
  assert sd['head.weight'].shape == (10, 32) and not sd['head.weight'].any()
  model = timm_vit(config, 'avg', num_classes=10, img_size=64)
  model.load_state_dict(to_torch_sd(sd), strict=True)
  want = timm.layers.resample_abs_pos_embed(torch.from_numpy(tables.fixed_tables(objective)['encoder/pos_embed']),
                                            (16, 16), antialias=False)
  assert max_err(sd['pos_embed'], want) < 1e-6
  with pytest.raises(ValueError, match='no classifier head'):
    export.export_state_dict(params, config, 'mae-official', num_classes=10)


# 2. HF transformers ViTMAEForPreTraining from the official layout.
@pytest.mark.parametrize('norm_pix_loss', [True, False])
@pytest.mark.parametrize('size', SIZE_PARAMS)
def test_mae_official_matches_hf_vitmae(size, norm_pix_loss):
  config, objective, params = model_and_params(size, norm_pix_loss)
  model = hf_vitmae(config)
  sd = export.export_state_dict(params, config, 'mae-official')
  assert size != 'B/16' or len(sd) == 254  # the reference's mae_vit_base_patch16 state_dict
  model.load_state_dict(to_torch_sd(official_to_hf(sd)), strict=True)
  images, noise = images_and_noise(config)
  loss, logits, mask = hf_outputs(model, images, noise)
  want_loss, want_logits, want_mask = jax_outputs(objective, params, images, noise)
  print(f'HF ViTMAE {size} norm_pix_loss={norm_pix_loss}: loss {loss:.6f} |d| {abs(loss - want_loss):.2e}, logits max |d| '
        f'{max_err(logits, want_logits):.2e}')
  np.testing.assert_array_equal(mask, want_mask)
  assert abs(loss - want_loss) < 1e-5 and max_err(logits, want_logits) < 1e-4


# 3. Bitwise round trips through files.
@pytest.mark.parametrize('fmt', TORCH_FORMATS)
@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_round_trip_is_bitwise(tmp_path, fmt, suffix):
  config, _, params = model_and_params('tiny')
  path = tmp_path / f'model{suffix}'
  export.save(export.export_state_dict(params, config, fmt), path, fmt)
  if suffix == '.pth':
    assert set(torch.load(path, weights_only=True)) == {'model'}
  back = export.import_state_dict(export.load_state_dict(path), config, fmt)
  assert set(back) == tables.scope(fmt) & set(params)
  flat = flax.traverse_util.flatten_dict(back)
  assert flat.keys() == flax.traverse_util.flatten_dict({k: params[k] for k in back}).keys()
  for path_, value in flax.traverse_util.flatten_dict({k: params[k] for k in back}).items():
    assert flat[path_].dtype == value.dtype and flat[path_].tobytes() == value.tobytes(), path_


@pytest.mark.slow
def test_round_trip_vit_b_is_bitwise(tmp_path):
  config, _, params = model_and_params('B/16')
  path = tmp_path / 'mae_b16.safetensors'
  export.save(export.export_state_dict(params, config, 'mae-official'), path, 'mae-official')
  back = export.import_state_dict(export.load_state_dict(path), config, 'mae-official')
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), back, params)))


# The command line, both verbs, in fresh processes, on a real orbax checkpoint of the CPU demo's model.
@pytest.mark.slow
def test_cli(tmp_path):
  from mae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config_file = 'configs/mae_tiny_cpu.py'
  config = load_config('mae_tiny_cpu')
  params = random_params(objectives.create(config), seed=1)
  saver = checkpoint.Checkpointer(str(tmp_path / 'run'), config.checkpoint)
  saver.save(7, {'params': params, 'step': 7}, config, force=True)
  saver.close()
  run = lambda *args: run_cli('export', *args, check=True).stdout
  assert 'wrote 86 tensors' in run(f'--workdir={tmp_path}/run', '--format=mae-official', f'--out={tmp_path}/m.pth')
  run('import', '--format=mae-official', f'--in={tmp_path}/m.pth', f'--config={config_file}',
      f'--out={tmp_path}/back.msgpack')
  back = export.load_init_params(tmp_path / 'back.msgpack')
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.tobytes() == np.asarray(b).tobytes(), back, params)))
