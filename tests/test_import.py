"""PyTorch -> JAX: the official release layouts (built from random PyTorch models) import and reproduce
the PyTorch outputs; unsafe pickles are refused; keys that do not fit are errors that name them."""
import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

from mae_jax import objectives  # pylint: disable=g-import-not-at-top
from mae_jax import export
from mae_jax.export import tables
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
