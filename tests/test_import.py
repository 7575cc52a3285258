"""PyTorch -> JAX: the official release layouts (built from random PyTorch models) import and reproduce
the PyTorch outputs; unsafe pickles are refused; keys that do not fit are errors that name them; a file that
is no PyTorch file, or holds tensors that cannot be weights, is named with what is wrong with it."""
import argparse
import io
import pathlib
import re
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip('torch')
safetensors_torch = pytest.importorskip('safetensors.torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

from mae_jax import objectives  # pylint: disable=g-import-not-at-top
from mae_jax import export
from mae_jax.config import ConfigError
from mae_jax.export import tables
from mae_jax.export import torch_import
from mae_jax.export.torch_import import UnreadableFileError
from mae_jax.models.vit import posemb_sincos_2d
from test_export import _fp32_matmuls  # pylint: disable=unused-import  (autouse fixture)
from test_export import (hf_outputs, hf_to_official, hf_vitmae, images_and_noise, jax_outputs, make_config,
                         max_err, model_and_params, nchw, timm_vit, to_torch_sd)


# 4. Unsafe pickles.
class _Payload:
  """Unpickling this writes a marker file: what a malicious checkpoint would do."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return exec, (f'open({self.marker!r}, "w").write("pwned")',)


def test_malicious_pickle_is_refused(tmp_path):
  for name in ('control', 'attack'):
    payload = {'model': {'cls_token': torch.zeros(1, 1, 32)}, 'x': _Payload(tmp_path / name)}
    torch.save(payload, tmp_path / f'{name}.pth')
  torch.load(tmp_path / 'control.pth', weights_only=False)  # proves the payload is live
  assert (tmp_path / 'control').exists()
  with pytest.raises(export.UnsafeFileError, match=r'refused: loading it would run pickled code.*needs exec'):
    export.load_state_dict(tmp_path / 'attack.pth')
  assert not (tmp_path / 'attack').exists()


def test_reference_training_checkpoint_with_args_loads(tmp_path):
  """The reference's checkpoint-*.pth carry an argparse.Namespace; that is allowed, the weights are read."""
  torch.save({'model': {'cls_token': torch.ones(1, 1, 4)}, 'epoch': 3, 'args': argparse.Namespace(lr=1e-3)},
             tmp_path / 'checkpoint-3.pth')
  assert list(export.load_state_dict(tmp_path / 'checkpoint-3.pth')) == ['cls_token']


def torch_bytes(obj, legacy=False):
  buffer = io.BytesIO()
  torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
  return buffer.getvalue()


def zip_of(name, text):
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w') as z:
    z.writestr(name, text)
  return buffer.getvalue()


SD = {'cls_token': torch.ones(1, 1, 4)}
NOISE = bytes(range(7, 256)) * 2  # no torch.save or safetensors magic at its start


NOT_STATE_DICTS = [
    ('noise.pth', NOISE, r'is not a PyTorch or safetensors file \(truncated, corrupt, or not a checkpoint at all\): '
                         r"its first bytes b'\\x07\\x08"),
    ('noise.safetensors', NOISE, 'is not a PyTorch or safetensors file'),
    ('page.pth', b'<!DOCTYPE html><html>Not Found</html>', "its first bytes b'<!DOCTYPE html><' begin neither"),
    ('empty.pth', b'', r'is empty \(0 bytes\): not a PyTorch or safetensors file'),
    ('cut.pth', torch_bytes({'model': SD})[:300], 'is a damaged torch.save archive: its zip directory is missing'),
    ('cut_legacy.pth', torch_bytes({'model': SD}, legacy=True)[:60], r'is a damaged torch.save file \(truncated'),
    ('other.zip.pth', zip_of('notes.txt', 'hello'),
     r"a zip archive but not a torch.save file \(no data.pkl among \['notes"),
    ('cut.safetensors', safetensors_torch.save(SD)[:-3], r'is a damaged safetensors file \(truncated or corrupt'),
    ('list.pth', torch_bytes([torch.ones(2)]), r'holds a list, not a state_dict \(a dict of tensors\)'),
    ('meta.pth', torch_bytes({'epoch': 3, 'optimizer': {'lr': 0.1}}),
     r"holds no tensors: not a state_dict, and no model or state_dict entry holding one \(its entries: \['epoch', "),
    ('mixed.pth', torch_bytes({'a': torch.ones(2), 'name': 'vit', 'z': torch.zeros(2, dtype=torch.complex64)}),
     r'entries that are not weights \(float or integer tensors\):\n  name: a str, not a weight\n'
     r'  z: a torch.complex64 tensor, not a weight'),
]


# Named by file: zip_of's bytes hold the time they were written, and pytest-xdist workers must collect the
# same test ids.
@pytest.mark.parametrize('name, data, message', NOT_STATE_DICTS, ids=[case[0] for case in NOT_STATE_DICTS])
def test_files_that_are_not_state_dicts_say_what_they_are(tmp_path, name, data, message):
  (tmp_path / name).write_bytes(data)
  with pytest.raises(UnreadableFileError, match=message):
    export.load_state_dict(tmp_path / name)


def test_a_cut_legacy_file_is_damaged_not_unsafe(tmp_path):
  """Cut inside a global's name ('torch._utils._rebuild_tens'), weights_only reports an unsupported global."""
  data = torch_bytes({'model': SD}, legacy=True)
  cut = data[:data.index(b'_rebuild_tensor') + len(b'_rebuild_tens')]
  (tmp_path / 'cut.pth').write_bytes(cut)
  with pytest.raises(UnreadableFileError, match=r'damaged torch.save file \(truncated or corrupt: it names '
                                                r'torch\._utils\._rebuild_\w+, which does not exist\)'):
    export.load_state_dict(tmp_path / 'cut.pth')


def test_a_lightning_checkpoint_is_unwrapped_and_one_with_objects_gets_a_conversion_command(tmp_path):
  sd = {'encoder.conv_in.weight': torch.randn(4, 3, 3, 3), 'quantize.embedding.weight': torch.randn(8, 4)}
  lightning = {'state_dict': sd, 'epoch': 7, 'global_step': 70, 'hyper_parameters': {'lr': 1e-4}}
  torch.save(lightning, tmp_path / 'vqgan.ckpt')
  got = export.load_state_dict(tmp_path / 'vqgan.ckpt')
  assert {k: v.tobytes() for k, v in got.items()} == {k: v.numpy().tobytes() for k, v in sd.items()}
  torch.save({**lightning, 'hyper_parameters': pathlib.PurePosixPath('configs/vqgan.yaml')}, tmp_path / 'obj.ckpt')
  with pytest.raises(export.UnsafeFileError, match='needs pathlib.PurePosixPath') as e:
    export.load_state_dict(tmp_path / 'obj.ckpt')
  command = re.search(r'python -c "(.+)"$', str(e.value))[1]
  exec(command)  # pylint: disable=exec-used  # the printed command, as a user runs it on a trusted file
  got = export.load_state_dict(tmp_path / 'obj.safetensors')
  assert {k: v.tobytes() for k, v in got.items()} == {k: v.numpy().tobytes() for k, v in sd.items()}
  with pytest.raises(ConfigError, match='convert PyTorch files first'):
    export.load_init_params(tmp_path / 'vqgan.ckpt')


def test_an_init_from_file_that_holds_no_imported_params_is_a_config_error(tmp_path):
  (tmp_path / 'noise.msgpack').write_bytes(NOISE)
  with pytest.raises(ConfigError, match=r'noise.msgpack is not a params file written by python -m mae_jax.export '
                                        r'import \(truncated, corrupt or another format: ExtraData'):
    export.load_init_params(tmp_path / 'noise.msgpack')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision_weights_import_exactly_and_their_fixed_tables_are_recognised(tmp_path, dtype, caplog):
  config, _, params = model_and_params('tiny')
  sd = export.export_state_dict(params, config, 'mae-official')
  half = {k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in sd.items()}
  torch.save({'model': half}, tmp_path / 'half.pth')
  export.import_file(tmp_path / 'half.pth', tmp_path / 'init.msgpack', config, 'mae-official')
  assert f'{len(sd)} {dtype} tensor(s) converted to float32 (exact)' in caplog.text
  want = export.import_state_dict({k: v.float().numpy() for k, v in half.items()}, config, 'mae-official',
                                 ignore=['pos_embed', 'decoder_pos_embed'])  # fixed: no params
  got = export.load_init_params(tmp_path / 'init.msgpack')
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.dtype == np.float32 and a.tobytes() == b.tobytes(), got,
                                          want)))
  torch.save({'model': {**half, 'pos_embed': half['pos_embed'] + 0.01}}, tmp_path / 'learned.pth')
  with pytest.raises(export.ConversionError, match='pos_embed: differs from the fixed sin-cos table'):
    export.import_file(tmp_path / 'learned.pth', tmp_path / 'x.msgpack', config, 'mae-official')


@pytest.mark.parametrize('cls_token', [True, False])  # ConvMAE's table has no cls row
def test_a_half_precision_sincos_table_is_recognised_with_or_without_a_cls_row(cls_token):
  own = posemb_sincos_2d(32, (4, 4), cls_token)[None].astype(np.float32)
  assert torch_import._sincos_at_precision(own.astype(ml_dtypes.bfloat16), 32).tobytes() == own.tobytes()
  assert torch_import._sincos_at_precision((own + 0.01).astype(ml_dtypes.bfloat16), 32) is None


def test_non_finite_integer_and_bool_weights_are_errors_naming_the_key(caplog):
  config, _, params = model_and_params('tiny')
  sd = export.export_state_dict(params, config, 'mae-official')
  qkv, fc1 = sd['blocks.0.attn.qkv.weight'].copy(), sd['blocks.1.mlp.fc1.weight'].copy()
  qkv[0, :2], fc1[3, 4] = np.nan, -np.inf
  bad = {**sd, 'blocks.0.attn.qkv.weight': qkv, 'blocks.1.mlp.fc1.weight': fc1,
         'norm.weight': sd['norm.weight'].astype(np.int64), 'mask_token': np.ones((1, 1, 32), bool),
         'embeddings.position_ids': np.arange(65)[None]}
  with pytest.raises(export.ConversionError) as e:
    export.import_state_dict(bad, config, 'mae-official')
  lines = str(e.value).splitlines()
  assert lines[0] == '4 tensor(s) of the file cannot be float32 weights:'
  assert lines[1:] == [
      '  blocks.0.attn.qkv.weight (96, 32): 2 of 3072 values are not finite (2 NaN, 0 Inf)',
      '  blocks.1.mlp.fc1.weight (128, 32): 1 of 4096 values are not finite (0 NaN, 1 Inf)',
      '  norm.weight (32,): a int64 tensor where a float weight is expected (a buffer? skip it with '
      '--ignore=norm.weight)',
      '  mask_token (1, 1, 32): a bool tensor where a float weight is expected (a buffer? skip it with '
      '--ignore=mask_token)']
  fixed = {**bad, 'blocks.0.attn.qkv.weight': sd['blocks.0.attn.qkv.weight'],
           'blocks.1.mlp.fc1.weight': sd['blocks.1.mlp.fc1.weight'], 'mask_token': sd['mask_token']}
  params = export.import_state_dict(fixed, config, 'mae-official', ignore=['norm.weight'],
                                    allow_missing=['norm.weight'])
  assert set(params['encoder']['norm']) == {'bias'}  # its scale skipped
  assert "skipped 1 integer buffer(s), not weights: ['embeddings.position_ids']" in caplog.text


# 5. The official release layouts, built from randomly initialised PyTorch models.
def randomize_(model):
  """Torch inits biases, norms (and HF the mask token) to constants; perturb them so every value counts."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 or name.endswith('mask_token'):
        p.add_(0.02 * torch.randn_like(p))
  return model


def hf_random_release(config):
  """A random HF ViTMAE with the fixed sin-cos tables of a release, built by HF's own function.

  transformers 5.24's fresh ViTMAEForPreTraining has all-zero position tables (its _init_weights skips the
  encoder's sin-cos init and zeroes the decoder's), so they are set here as HF's weight conversion holds them.
  """
  build_sincos = transformers.models.vit_mae.modeling_vit_mae.build_2d_sinusoidal_position_embedding
  model = randomize_(hf_vitmae(config))
  with torch.no_grad():
    for table in (model.vit.embeddings.position_embeddings, model.decoder.decoder_pos_embed):
      side, dim = int((table.shape[1] - 1) ** 0.5), table.shape[-1]
      sincos = build_sincos(side, side, dim, cls_token=True)
      table.copy_(torch.cat([sincos[:, dim // 2:], sincos[:, :dim // 2]], dim=1)[None])  # HF's [h|w] -> MAE's [w|h]
  return model


def encoder_release(config):
  """A timm ViT laid out like mae_pretrain_vit_*.pth (encoder only, fixed sin-cos pos_embed, norm)."""
  model = randomize_(timm_vit(config, 'token'))
  with torch.no_grad():
    model.pos_embed.copy_(torch.from_numpy(tables.fixed_tables(objectives.create(config))['encoder/pos_embed']))
  return model


@pytest.mark.parametrize('norm_pix_loss', [True, False])
def test_import_full_release_layout(tmp_path, norm_pix_loss):
  """mae_pretrain_vit_*_full.pth (norm-pix) and mae_visualize_vit_*.pth (pixels): encoder and decoder."""
  config = make_config('tiny', norm_pix_loss)
  objective = objectives.create(config)
  model = hf_random_release(config)
  sd = hf_to_official({k: v.numpy() for k, v in model.state_dict().items()})
  assert len(sd) == 4 + 4 + 12 * (objective.encoder.depth + objective.decoder.depth) + 6
  torch.save({'model': to_torch_sd(sd)}, tmp_path / 'release.pth')
  export.import_file(tmp_path / 'release.pth', tmp_path / 'init.msgpack', config, 'mae-official')
  params = export.load_init_params(tmp_path / 'init.msgpack')
  images, noise = images_and_noise(config, seed=1)
  loss, logits, _ = hf_outputs(model, images, noise)
  want_loss, want_logits, _ = jax_outputs(objective, params, images, noise)
  print(f'import tiny norm_pix={norm_pix_loss}: loss |d| {abs(loss - want_loss):.2e}, logits max |d| '
        f'{max_err(logits, want_logits):.2e}')
  assert abs(loss - want_loss) < 1e-5 and max_err(logits, want_logits) < 1e-4


def test_import_encoder_only_release_layout(tmp_path):
  config = make_config('tiny')
  objective = objectives.create(config)
  model = encoder_release(config)
  torch.save({'model': model.state_dict()}, tmp_path / 'mae_pretrain_vit_tiny.pth')
  sd = export.load_state_dict(tmp_path / 'mae_pretrain_vit_tiny.pth')
  with pytest.raises(export.ConversionError, match=r'decoder_embed\.weight: missing'):
    export.import_state_dict(sd, config, 'mae-official')
  params = export.import_state_dict(sd, config, 'mae-official', allow_missing=['decoder*', 'mask_token'])
  assert set(params) == {'encoder'}
  images, _ = images_and_noise(config)
  with torch.no_grad():
    want = model.forward_features(nchw(images))
  err = max_err(objective.encoder.apply({'params': params['encoder']}, images)['tokens'], want)
  print(f'encoder-only release: max |d| {err:.2e}')
  assert err < 1e-4


def test_import_finetuned_layout_names_what_cannot_load():
  """A fine-tuned timm ViT: learned pos_embed and a head have no place in the JAX encoder."""
  config = make_config('tiny')
  model = timm_vit(config, 'avg', num_classes=5)
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  with pytest.raises(export.ConversionError) as e:
    export.import_state_dict(sd, config, 'timm-vit-avg')
  assert 'pos_embed: differs from the fixed sin-cos table of its 8x8 grid' in str(e.value)
  assert 'head.weight (5, 32): unexpected, the model has no param head/kernel' in str(e.value)
  params = export.import_state_dict(sd, config, 'timm-vit-avg', ignore=['pos_embed', 'head.*'])
  assert params['encoder']['norm']['scale'].tobytes() == sd['fc_norm.weight'].tobytes()


def test_import_errors_name_the_key():
  config, _, params = model_and_params('tiny')
  sd = export.export_state_dict(params, config, 'mae-official')
  extra = {**sd, 'blocks.7.norm1.weight': sd['blocks.0.norm1.weight'], 'decoder.bogus': sd['norm.bias']}
  with pytest.raises(export.ConversionError) as e:
    export.import_state_dict(extra, config, 'mae-official')
  assert 'blocks.7.norm1.weight (32,): unexpected, the model has no param encoder/blocks_7/norm1/scale' in str(
      e.value)
  assert 'decoder.bogus (32,): unexpected, no rule' in str(e.value)
  wrong = {**sd, 'decoder_pred.weight': sd['decoder_pred.weight'][:, :16]}
  shape_error = r'decoder_pred\.weight: shape \(48, 16\) gives decoder/decoder_pred/kernel \(16, 48\), the model has \(32'
  with pytest.raises(export.ConversionError, match=shape_error):
    export.import_state_dict(wrong, config, 'mae-official')
  with pytest.raises(export.ConversionError, match=r'encoder/extra \(3,\): no rule'):
    export.export_state_dict({**params, 'encoder': {**params['encoder'], 'extra': np.zeros(3)}}, config, 'timm-vit')


def test_import_to_another_resolution_recomputes_the_fixed_tables(caplog):
  config, _, params = model_and_params('tiny')
  sd = export.export_state_dict(params, config, 'mae-official')
  back = export.import_state_dict(sd, make_config('tiny', img_size=64), 'mae-official')
  assert 'trained on a 8x8 patch grid, the model uses 16x16' in caplog.text
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), back, params)))
