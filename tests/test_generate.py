"""MAGE generation (issue 14): the decoding loop against an independent PyTorch implementation of the reference's
(gen_img_uncond.py `gen_image`, spec mage.md 1.8 and 7), per-image seeds on any mesh, editing, the command and the
FID evaluator during pretraining.

The PyTorch side is test_mage.py's `TorchMAGE` fed the same weights through the 'mage-official' table. Its
randomness is given explicitly: `Categorical(logits).sample()` becomes a Gumbel-max over the given noise (the same
distribution) and `np.random.gumbel` the given choice noise, both drawn by the JAX loop's own `step_noise`. One
flipped sample changes every later step (spec 7), so each step is compared from the same token state.
"""
import json
import math
import os
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import load_config, run_cli, run_main, run_worker
from mae_jax import export, frozen, objectives, sharding
from mae_jax.data import sources
from mae_jax.models import inception
from mae_jax.objectives import mage_generation as generation

torch = pytest.importorskip('torch')
from test_mage import random_params, tiny_config, to_torch_sd, torch_mage  # noqa: E402  (needs torch)


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


# ---- the reference loop in PyTorch ----

def torch_gen_image(model, tokens, num_iter, choice_temperature, noise):
  """gen_image's loop from `tokens` (N, L), with noise[step] = (sample noise (N, L, codebook), choice noise (N, L)).
  Returns per step {'tokens' (its input), 'sampled', 'confidence', 'masking'}."""
  mask_id, seq_len, records = model.mask_token_label, model.seq_len, []
  token_indices = torch.from_numpy(np.asarray(tokens)).long()
  for step in range(num_iter):
    cur_ids = token_indices.clone().long()
    token_indices = torch.cat([torch.full((cur_ids.shape[0], 1), model.fake_class_label), cur_ids], dim=1).long()
    token_all_mask = token_indices == mask_id
    token_drop_mask = torch.zeros_like(token_indices)  # nothing dropped at inference
    x = model.token_emb(token_indices)
    for block in model.blocks:
      x = block(x)
    x = model.norm(x)
    logits = model.forward_decoder(x, token_drop_mask, token_all_mask)[:, 1:, :model.codebook]
    sample_noise, choice_noise = noise[step]
    sampled_ids = (logits + torch.from_numpy(np.array(sample_noise))).argmax(-1)  # Categorical(logits).sample()
    unknown_map = cur_ids == mask_id
    sampled_ids = torch.where(unknown_map, sampled_ids, cur_ids)
    ratio = 1. * (step + 1) / num_iter
    mask_ratio = np.cos(math.pi / 2. * ratio)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    selected_probs = torch.squeeze(torch.gather(probs, dim=-1, index=torch.unsqueeze(sampled_ids, -1)), -1)
    selected_probs = torch.where(unknown_map, selected_probs.double(), np.inf).float()
    mask_len = torch.Tensor([np.floor(seq_len * mask_ratio)])
    mask_len = torch.maximum(torch.Tensor([1]), torch.minimum(torch.sum(unknown_map, dim=-1, keepdims=True) - 1,
                                                              mask_len))
    # mask_by_random_topk(mask_len[0], selected_probs, choice_temperature * (1 - ratio))
    temperature, mask_len = choice_temperature * (1 - ratio), mask_len[0].squeeze().long()
    confidence = torch.log(selected_probs) + torch.Tensor(temperature * np.asarray(choice_noise, np.float64))
    sorted_confidence, _ = torch.sort(confidence, axis=-1)
    cut_off = sorted_confidence[:, mask_len - 1:mask_len]
    masking = confidence <= cut_off
    records.append({'tokens': cur_ids.numpy(), 'sampled': sampled_ids.numpy(), 'confidence': confidence.numpy(),
                    'masking': masking.numpy()})
    token_indices = torch.where(masking, mask_id, sampled_ids)
  return records


def decoding_parity(config, batch, num_iter, choice_temperature, seed=0, whole=True):
  """Per step (max |d confidence|, sampled ids equal, re-masked sets equal), the JAX (None unless `whole`: the
  jitted loop run through) and torch final ids, the number of tokens each step revealed."""
  model = objectives.create(config)
  params = random_params(model, seed)
  torch_model = torch_mage(model)
  torch_model.load_state_dict(to_torch_sd(export.export_state_dict(params, config, 'mage-official')), strict=True)
  keys = generation.image_keys(seed, jnp.arange(batch))
  length, vocab = model.num_tokens, model.codebook_size
  noise_fn = jax.jit(lambda step: generation.step_noise(keys, step, length, vocab))
  noise = [jax.device_get(noise_fn(step)) for step in range(num_iter)]
  start = np.full((batch, length), model.mask_id, np.int32)
  with torch.no_grad():
    records = torch_gen_image(torch_model, start, num_iter, choice_temperature, noise)
  table, temperatures = generation.mask_len_table(num_iter, length), generation.choice_temperatures(
      choice_temperature, num_iter)
  step_fn = jax.jit(lambda p, tokens, step, sample_noise, choice_noise: generation.decode_step(
      model, p, tokens, jnp.full((batch,), length), table, temperatures, step, sample_noise, choice_noise))
  steps = []
  for step, record in enumerate(records):
    out = jax.device_get(step_fn(params, record['tokens'].astype(np.int32), step, *noise[step]))
    finite = np.isfinite(record['confidence'])
    assert (finite == np.isfinite(out['confidence'])).all()
    steps.append((float(np.abs(out['confidence'][finite] - record['confidence'][finite]).max()),
                  bool((out['sampled'] == record['sampled']).all()), bool((out['masking'] == record['masking']).all())))
  decode = jax.jit(lambda p: generation.decode(model, p, jnp.asarray(start), keys, num_iter, choice_temperature))
  ids = np.asarray(decode(params)) if whole else None
  revealed = [int((r['tokens'] == model.mask_id).sum() - r['masking'].sum()) // batch for r in records]
  return steps, ids, records[-1]['sampled'], revealed


def check_parity(steps, ids, torch_ids, name):
  """Every step equal; and the whole run's ids, when there is one."""
  worst = max(s[0] for s in steps)
  whole = '' if ids is None else f'; whole run ids equal: {bool((ids == torch_ids).all())}'
  print(f'{name} decoding vs the PyTorch reference loop, {len(steps)} steps: max |d confidence| {worst:.2e}; sampled '
        f'ids equal at {sum(s[1] for s in steps)}/{len(steps)} steps, re-masked sets at {sum(s[2] for s in steps)}'
        + whole)
  assert worst < 1e-4 and all(s[1] and s[2] for s in steps)
  if ids is not None:
    np.testing.assert_array_equal(ids, torch_ids)


def test_tiny_decoding_matches_the_reference_loop_step_by_step_and_whole():
  steps, ids, torch_ids, revealed = decoding_parity(tiny_config(), batch=3, num_iter=20, choice_temperature=6.0)
  check_parity(steps, ids, torch_ids, 'tiny')
  # floor(64 cos(pi/2 (t+1)/20)) stay masked after step t; the clamp keeps one masked until the last step.
  assert sum(revealed) == 64 - 1 and revealed[0] == 64 - math.floor(64 * math.cos(math.pi / 40))


@pytest.mark.slow
def test_vitb_decoding_matches_the_reference_loop_step_by_step():
  """Step-wise at ViT-B over a 4-step schedule (first, middle and last steps; the whole loop is the tiny test's)."""
  steps, ids, torch_ids, _ = decoding_parity(load_config('mage_vitb'), batch=2, num_iter=4, choice_temperature=4.5,
                                             whole=False)
  check_parity(steps, ids, torch_ids, 'ViT-B')


def test_schedule_tables():
  table = generation.mask_len_table(20, 256)
  assert table[:, 256].tolist() == [math.floor(256 * math.cos(math.pi / 2 * (t + 1) / 20)) for t in range(20)]
  assert table[-1].max() == 0 and table[0, 100] == math.floor(100 * math.cos(math.pi / 40))
  np.testing.assert_allclose(generation.choice_temperatures(6.0, 20), 6.0 * (1 - np.arange(1, 21) / 20), rtol=1e-6)
  assert generation.choice_temperatures(6.0, 20)[0] == np.float32(5.7)  # 6.0 x 19/20 first, 0 last (spec 7 item 1)


# ---- the same seed, the same images, on any mesh ----

def worker_meshes():
  """The tiny model's images of seed 3 on 8 devices (one batch of 8) and on 1 device (two batches of 4)."""
  config = tiny_config()
  model = objectives.create(config)
  params = random_params(model)
  out = {}
  for name, devices, size in (('8 devices', jax.devices(), 8), ('1 device', jax.devices()[:1], 4)):
    mesh = sharding.create_mesh({'data': -1, 'fsdp': 1}, devices)
    tokenizer, _ = frozen.load(model.frozen_networks(), config, mesh)
    run = generation.jit_generate(model, mesh, num_iter=6, choice_temperature=4.5)
    batches = [run({**params, **tokenizer}, 3, np.arange(s, s + size, dtype=np.int32)) for s in range(0, 8, size)]
    images, ids = zip(*batches)
    out[name] = {'images': np.concatenate(images).tolist(), 'ids': np.concatenate(ids).tolist()}
  return out


@pytest.mark.slow
@pytest.mark.multidevice
def test_the_same_seed_gives_the_same_images_on_any_mesh():
  out = run_worker(__file__, 'meshes', num_devices=8, timeout=600)
  eight, one = out['8 devices'], out['1 device']
  np.testing.assert_array_equal(eight['ids'], one['ids'])
  images8, images1 = np.asarray(eight['images']), np.asarray(one['images'])
  assert images8.shape == (8, 32, 32, 3) and len(np.unique(np.asarray(eight['ids'])[:, 0])) > 1
  assert np.abs(images8 - images1).max() <= 1  # the VQGAN's float32 rounding may differ in the last bit


# ---- editing ----

def test_box_masks_follow_the_issue_recipe():
  inpaint = generation.box_token_mask((64, 64, 192, 192), 256, 16).reshape(16, 16)
  rows = np.flatnonzero(inpaint.any(1))
  assert rows.tolist() == list(range(3, 13)) and (inpaint[3:13, 3:13]).all() and inpaint.sum() == 100  # LTH14/mage#3
  outpaint = generation.box_token_mask((64, 64, 192, 192), 256, 16, outpaint=True).reshape(16, 16)
  assert (~outpaint).sum() == 36 and (~outpaint[5:11, 5:11]).all()  # tokens 4-11 inside the box, less the border
  assert generation.box_token_mask((0, 0, 5, 5), 32, 4).reshape(8, 8)[:3, :3].all()  # clipped at the edge
  for bad in ((0, 0, 0, 4), (0, 0, 33, 4), (-1, 0, 4, 4), (1, 2, 3)):
    with pytest.raises(ValueError, match='is not x0,y0,x1,y1'):
      generation.check_box(bad, 32)


def test_inpainting_keeps_the_tokens_outside_the_box_and_border():
  config = tiny_config()
  model = objectives.create(config)
  mesh = sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  params = {**random_params(model), **frozen.load(model.frozen_networks(), config, mesh)[0]}
  pixels = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  masked = np.stack([generation.box_token_mask((8, 4, 20, 16), 32, 4),
                     generation.box_token_mask((8, 4, 20, 16), 32, 4, outpaint=True)])
  keys = generation.image_keys(0, jnp.arange(2))
  out = jax.device_get(jax.jit(lambda p: generation.edit(model, p, pixels, masked, keys, 8, 4.5))(params))
  np.testing.assert_array_equal(out['ids'][~masked], out['known'][~masked])  # every kept token unchanged
  assert (out['known'][masked] == model.mask_id).all() and (out['ids'] < model.codebook_size).all()
  assert (out['known'][~masked] < model.codebook_size).all()  # the kept ones are the image's tokens
  grey = np.asarray(generation.token_pixels(masked, 4))[..., 0] > 0
  assert (out['mask'][grey] == 0.5).all() and out['output'].shape == (2, 32, 32, 3)
  ratio = jax.device_get(generation.random_token_mask(keys, 64, 0.3))
  assert ratio.sum(1).tolist() == [math.ceil(64 * 0.3)] * 2 and (ratio[0] != ratio[1]).any()


# ---- the command and the FID evaluator ----

def write_random_release(path, config):
  """Random params of `config`'s MAGE as `python -m mae_jax.export import` writes them."""
  params = random_params(objectives.create(config))
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(params))
  return str(path)


def read_png(path):
  return np.asarray(Image.open(path))


@pytest.mark.slow
def test_the_command_generates_pngs_and_a_grid_from_an_imported_release(tmp_path):
  release = write_random_release(tmp_path / 'release.msgpack', load_config('mage_tiny_cpu'))
  out = tmp_path / 'samples'
  result = run_cli('generate', f'--init_from={release}', '--config=configs/mage_tiny_cpu.py', f'--out={out}',
                   '--num_images=5', '--batch=4', '--num_iter=4', f'--grid={tmp_path / "new" / "grid.png"}', check=True)
  assert sorted(os.listdir(out)) == [f'{i:05d}.png' for i in range(5)], result.stderr
  assert read_png(out / '00004.png').shape == (32, 32, 3)
  assert read_png(tmp_path / 'new' / 'grid.png').shape == (36, 8 * 36, 3)  # its folder made
  release_args = [f'--init_from={release}', '--config=configs/mage_tiny_cpu.py']
  nope = tmp_path / 'nope'
  for args, message in (([f'--workdir={nope}', f'--out={out}'], f'--workdir={nope} does not exist'),
                        ([*release_args, f'--out={out / "00000.png"}'], 'is a file; name a folder'),
                        ([*release_args, f'--out={out}', '--grid=grid.jpg'], 'the grid is a PNG')):
    refused = run_cli('generate', *args)
    assert refused.returncode == 2 and 'Traceback' not in refused.stderr, refused.stderr
    assert refused.stderr.strip().startswith('mae_jax.generate: error: ') and message in refused.stderr


@pytest.fixture(scope='module')
def inception_weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.pth')
  inception.save_torch(inception.random_variables(seed=0), path)
  return path


@pytest.mark.slow
def test_pretraining_with_fid_then_generating_and_editing_from_the_workdir(tmp_path, inception_weights):
  """The tiny MAGE trains a few steps with the FID evaluator on (no eval split; the random Inception: a smoke
  figure, meaningless as a FID), then the command samples and edits from its workdir."""
  reference = tmp_path / 'digits'
  os.makedirs(reference)
  for i, image in enumerate(sources.embedded_digits('test').images[:6]):  # held-out digits
    Image.fromarray(image).save(reference / f'{i:05d}.png')
  workdir, out = tmp_path / 'mage', tmp_path / 'out'
  result = run_main('--config=configs/mage_tiny_cpu.py', f'--workdir={workdir}', '--config.train.num_steps=4',
                    '--config.data.eval_split=', '--config.log.every_steps=2', '--config.checkpoint.every_steps=4',
                    "--config.eval.evaluators=('fid',)", f'--config.eval.fid.inception_weights={inception_weights}',
                    f'--config.eval.fid.reference={reference}', '--config.eval.fid.num_images=4',
                    '--config.eval.fid.batch_size=4', '--config.eval.fid.isc_splits=2', '--config.eval.fid.num_iter=4',
                    check=True)
  scores = [r for r in map(json.loads, open(workdir / 'metrics.jsonl')) if 'gen/fid' in r]
  print(f'tiny MAGE, random-weight Inception (a smoke figure): {scores}')
  assert [r['step'] for r in scores] == [0, 4] and all(np.isfinite(r['gen/fid']) and r['gen/is'] >= 1 for r in scores)
  assert 'step 4: gen/fid' in result.stdout
  run_cli('generate', f'--workdir={workdir}', f'--out={out / "gen"}', '--num_images=3', '--num_iter=4', check=True)
  assert len(os.listdir(out / 'gen')) == 3
  image = reference / '00000.png'
  for edit, extra in (('inpaint', '--box=8,8,24,24'), ('reconstruct', '--mask_ratio=0.5')):  # outpaint: box masks
    run_cli('generate', f'--workdir={workdir}', f'--out={out / edit}', f'--{edit}={image}', extra, '--num_images=2',
            '--num_iter=4', check=True)
    panel = read_png(out / edit / 'panel_00001.png')
    assert panel.shape == (36, 3 * 36, 3) and sorted(os.listdir(out / edit))[:2] == ['00000.png', '00001.png']
    np.testing.assert_array_equal(panel[2:34, 2:34], read_png(image))  # the input, as given at the model's size
  bad_box = run_cli('generate', f'--workdir={workdir}', f'--out={out / "x"}', f'--inpaint={image}', '--box=8,8,40,24')
  assert bad_box.returncode == 2 and 'Traceback' not in bad_box.stderr
  assert 'mae_jax.generate: error: --box: box 8,8,40,24 is not' in bad_box.stderr


if __name__ == '__main__':
  assert len(jax.devices()) == 8, jax.devices()
  print(json.dumps({'meshes': worker_meshes}[sys.argv[1]]()), flush=True)
