"""MR-MAE: the frozen CLIP / DINO teachers against their PyTorch references, their importers, the objective.

Teacher parity builds random-weight PyTorch modules (HF transformers' CLIPVisionModel, timm's CLIP ViT and
timm's vit_base_patch16_224 with DINO's settings): tiny ones in the quick tier, ViT-B/16 in `slow`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.export import engine, torch_import
from mae_jax.export import teachers as teacher_io
from mae_jax.models import teachers

# perturb: the std of the noise added to every init weight (ViT-B's activations grow large with much more)
TINY = dict(width=32, depth=2, heads=2, patch=4, img=32, proj=16, perturb=0.05)
VITB = dict(width=768, depth=12, heads=12, patch=16, img=224, proj=512, perturb=0.01)
PARITY_ATOL = 1e-4


def perturb(model, std, seed=0):
  """Every parameter moved off its init (LayerNorm scales off 1, biases off 0), so each one matters."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(std * torch.randn(p.shape, generator=gen))
  return model.eval()


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_clip(size):
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(
      hidden_size=size['width'], intermediate_size=4 * size['width'], num_hidden_layers=size['depth'],
      num_attention_heads=size['heads'], image_size=size['img'], patch_size=size['patch'],
      projection_dim=size['proj'], hidden_act='quick_gelu', layer_norm_eps=1e-5)
  return perturb(transformers.CLIPVisionModelWithProjection(config), size['perturb'])


def timm_vit(size, clip):
  import timm.models.vision_transformer as tv
  import torch
  torch.manual_seed(0)
  options = dict(pre_norm=True, norm_layer=torch.nn.LayerNorm, act_layer='quick_gelu',
                 num_classes=size['proj']) if clip else dict(num_classes=0)
  model = perturb(tv.VisionTransformer(img_size=size['img'], patch_size=size['patch'], embed_dim=size['width'],
                                       depth=size['depth'], num_heads=size['heads'], **options), size['perturb'])
  if clip:
    with torch.no_grad():
      model.head.bias.zero_()  # timm's conversion of OpenAI CLIP: the projection has no bias
  return model


def images(size, n=2, seed=1):
  return np.random.default_rng(seed).standard_normal((n, size['img'], size['img'], 3)).astype(np.float32)


def ours(params, arch, size, x):
  """Every output of our teacher for the imported params."""
  dims = dict(width=size['width'], depth=size['depth'], num_heads=size['heads'], patch_size=size['patch'])
  proj = params['encoder']['head']['kernel'].shape[1] if 'head' in params['encoder'] else 0
  teacher = teachers.module(arch, dims, size['img'], proj)
  out = jax.jit(lambda p, x: teacher.apply({'params': p}, x))(params['encoder'], x)
  return jax.tree.map(np.asarray, out)


def torch_input(x):
  import torch
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def timm_states(model, x):
  """timm's first block input, every block's output, forward_features (after `norm`) and the head's output."""
  import torch
  captured = []
  hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o)) for block in model.blocks]
  hooks.append(model.blocks[0].register_forward_pre_hook(lambda m, i: captured.insert(0, i[0])))
  with torch.no_grad():
    features = model.forward_features(torch_input(x))
    head = model.forward_head(features)
  for hook in hooks:
    hook.remove()
  return [c.numpy() for c in captured], features.numpy(), head.numpy()


def assert_close(got, want, what):
  err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
  assert err <= PARITY_ATOL, f'{what}: max |diff| {err:.3g}'
  return err


def check_hf_clip(size):
  import torch
  model = hf_clip(size)
  x = images(size)
  with torch.no_grad():
    ref = model.vision_model(torch_input(x), output_hidden_states=True)
    embeds = model.visual_projection(ref.pooler_output)
  params = teacher_io.import_state_dict(numpy_state_dict(model), 'clip-hf')
  out = ours(params, 'clip', size, x)
  states = (out['block_input'],) + out['blocks']
  assert len(states) == len(ref.hidden_states) == size['depth'] + 1
  errs = [assert_close(s, r.numpy(), f'hidden_states[{i}]') for i, (s, r) in enumerate(zip(states, ref.hidden_states))]
  errs.append(assert_close(out['pre_norm'], ref.last_hidden_state.numpy(), 'last_hidden_state (before post_layernorm)'))
  errs.append(assert_close(out['pooled'], ref.pooler_output.numpy(), 'pooler_output'))
  errs.append(assert_close(out['logits'], embeds.numpy(), 'image_embeds (projected)'))
  return max(errs)


def check_timm(size, clip):
  model = timm_vit(size, clip)
  x = images(size)
  ref_states, ref_features, ref_head = timm_states(model, x)
  params = teacher_io.import_state_dict(numpy_state_dict(model), 'clip-timm' if clip else 'dino')
  out = ours(params, 'clip' if clip else 'dino', size, x)
  states = (out['block_input'],) + out['blocks']
  errs = [assert_close(s, r, f'hidden state {i}') for i, (s, r) in enumerate(zip(states, ref_states))]
  errs.append(assert_close(out['tokens'], ref_features, 'forward_features (after norm)'))
  if clip:
    errs.append(assert_close(out['logits'], ref_head, 'head (projection of the cls token)'))
  return max(errs)


def test_clip_tower_matches_hf_clip_vision_model():
  check_hf_clip(TINY)


def test_clip_tower_matches_timm_clip_vit():
  check_timm(TINY, clip=True)


def test_dino_matches_timm_vit_with_dino_settings():
  check_timm(TINY, clip=False)


@pytest.mark.slow
@pytest.mark.parametrize('check', ['hf_clip', 'timm_clip', 'timm_dino'])
def test_vitb16_teachers_match_their_references(check):
  {'hf_clip': lambda: check_hf_clip(VITB), 'timm_clip': lambda: check_timm(VITB, True),
   'timm_dino': lambda: check_timm(VITB, False)}[check]()


# ---- importers: strict, exact both ways ----

def assert_same_state_dict(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def hf_state_dict():
  return {k: v for k, v in numpy_state_dict(hf_clip(TINY)).items() if not k.endswith('position_ids')}


@pytest.mark.parametrize('fmt', ['clip-hf', 'clip-timm', 'dino'])
def test_a_teacher_file_round_trips_exactly(fmt):
  sd = hf_state_dict() if fmt == 'clip-hf' else numpy_state_dict(timm_vit(TINY, clip=fmt == 'clip-timm'))
  params = teacher_io.import_state_dict(sd, fmt)
  assert_same_state_dict(teacher_io.export_state_dict(params, fmt), sd)


def test_openai_and_open_clip_layouts_hold_the_same_tower():
  params = teacher_io.import_state_dict(hf_state_dict(), 'clip-hf')
  openai = teacher_io.export_state_dict(params, 'clip-openai')
  assert openai['class_embedding'].shape == (TINY['width'],) and openai['proj'].shape == (TINY['width'], TINY['proj'])
  # open_clip's full model: the tower under `visual.`, next to the text tower (left out).
  full = {**{f'visual.{k}': v for k, v in openai.items()}, 'token_embedding.weight': np.zeros((8, 4), np.float32),
          'positional_embedding': np.zeros((7, 4), np.float32), 'logit_scale': np.zeros((), np.float32)}
  for sd in (openai, full):
    again = teacher_io.import_state_dict(sd, 'clip-openai')
    jax.tree.map(np.testing.assert_array_equal, again, params)
  assert_same_state_dict(teacher_io.export_state_dict(again, 'clip-openai'), openai)
  # HF CLIPModel: the text tower and logit_scale are left out as well.
  clip_model = {**hf_state_dict(), 'text_model.embeddings.token_embedding.weight': np.zeros((8, 4), np.float32),
                'text_projection.weight': np.zeros((4, 4), np.float32), 'logit_scale': np.zeros((), np.float32)}
  jax.tree.map(np.testing.assert_array_equal, teacher_io.import_state_dict(clip_model, 'clip-hf'), params)


def test_teacher_importers_name_every_missing_or_unexpected_key():
  sd = hf_state_dict()
  broken = {k: v for k, v in sd.items() if k != 'vision_model.encoder.layers.1.self_attn.k_proj.weight'}
  with pytest.raises(engine.ConversionError, match=r'encoder\.layers\.1\.self_attn\.k_proj\.weight: missing'):
    teacher_io.import_state_dict(broken, 'clip-hf')
  with pytest.raises(engine.ConversionError, match=r'vision_model\.encoder\.extra\.weight|encoder\.extra\.weight.*unexpected'):
    teacher_io.import_state_dict({**sd, 'vision_model.encoder.extra.weight': np.zeros(3, np.float32)}, 'clip-hf')
  openai = teacher_io.export_state_dict(teacher_io.import_state_dict(sd, 'clip-hf'), 'clip-openai')
  with pytest.raises(engine.ConversionError, match=r'ln_post\.weight: missing from the file'):
    teacher_io.import_state_dict({k: v for k, v in openai.items() if k != 'ln_post.weight'}, 'clip-openai')
  dino = numpy_state_dict(timm_vit(TINY, clip=False))
  with pytest.raises(engine.ConversionError, match=r"head\.weight \(10, 32\): unexpected"):
    teacher_io.import_state_dict({**dino, 'head.weight': np.zeros((10, 32), np.float32)}, 'dino')
  clip_timm = numpy_state_dict(timm_vit(TINY, clip=True))
  with pytest.raises(engine.ConversionError, match=r'head\.bias: not zero'):
    teacher_io.import_state_dict({**clip_timm, 'head.bias': np.ones(TINY['proj'], np.float32)}, 'clip-timm')


@pytest.mark.filterwarnings('ignore::FutureWarning')  # torch.jit is deprecated; such files are still out there
def test_the_openai_torchscript_archive_is_refused_naming_a_layout_that_works(tmp_path):
  import torch
  path = str(tmp_path / 'ViT-B-16.pt')
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
  with pytest.raises(torch_import.UnsafeFileError, match=r'TorchScript archive.*--format=clip-hf'):
    torch_import.load_state_dict(path)


def test_the_export_command_imports_a_teacher_without_a_config(tmp_path):
  import safetensors.numpy
  from conftest import run_cli
  sd = numpy_state_dict(timm_vit(TINY, clip=False))
  safetensors.numpy.save_file(sd, str(tmp_path / 'dino.safetensors'))
  out = tmp_path / 'dino.msgpack'
  run_cli('export', 'import', '--format=dino', f'--in={tmp_path / "dino.safetensors"}', f'--out={out}', check=True)
  params = torch_import.load_init_params(str(out))
  jax.tree.map(np.testing.assert_array_equal, params, teacher_io.import_state_dict(sd, 'dino'))


# ---- the objective ----

def write_teacher(path, arch, variant, img_size, proj_dim=0, seed=3):
  """A random teacher's params file as `python -m mae_jax.export import` writes it ({'encoder': params})."""
  import flax
  teacher = teachers.module(arch, variant, img_size, proj_dim)
  params = teacher.init(jax.random.key(seed), jnp.zeros((1, img_size, img_size, 3)))['params']
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize({'encoder': jax.tree.map(np.asarray, params)}))
  return str(path)


def pico_config(tmp_path, **mr_mae):
  """The tiny demo with a pico student and two random pico teachers: CLIP (its file at another resolution, so
  the table is resampled; its projection as the target) and DINO (two layers, the cls token, cosine on l2)."""
  from conftest import load_config
  c = load_config('mr_mae_tiny_cpu')
  c.model.variant = 'pico/4'
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.data.eval_split = ''
  c.train.update(batch_size=8, num_steps=3)
  c.mr_mae.teachers.clip.update(variant='pico/4', feature='proj', proj_dim=16, weight=0.5,
                                init_from=write_teacher(tmp_path / 'clip.msgpack', 'clip', 'pico/4', 16, 16))
  c.mr_mae.teachers.dino.update(variant='pico/4', layers=(1, -1), cls=True, loss='cosine', target_norm='l2',
                                init_from=write_teacher(tmp_path / 'dino.msgpack', 'dino', 'pico/4', 32))
  c.mr_mae.use = ('clip', 'dino')
  c.mr_mae.update(mr_mae)
  return c


def example_batch(c, n=4, seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.standard_normal((n, c.data.img_size, c.data.img_size, 3)).astype(np.float32),
          'label': np.zeros((n,), np.int32),
          'example_key': np.asarray(jax.random.key_data(jax.random.split(jax.random.key(seed), n)))}


def objective_and_params(c):
  from mae_jax import config as config_lib
  from mae_jax import frozen, objectives
  config_lib.validate(c)
  objective = objectives.create(c)
  params = objective.init(jax.random.key(0))
  teachers_params = {name: jax.tree.map(jnp.asarray, frozen.read(net, c))
                     for name, net in objective.frozen_networks().items()}
  return objective, params, teachers_params


def test_the_mimic_loss_sees_only_visible_tokens_and_the_pixel_loss_only_masked_patches(tmp_path):
  """On the jitted loss: gradients w.r.t. an offset added to every teacher target and to every predicted patch."""
  from unittest import mock
  c = pico_config(tmp_path)
  objective, params, frozen_params = objective_and_params(c)
  batch = example_batch(c)
  mask = np.asarray(objective.random_masking(objective.sample_noise(batch['example_key'])).mask)  # 1: masked
  features, decode = objective.teacher_features, objective.decode

  def loss(offsets, pred_offset):
    shifted = lambda p, x: {n: [f + o for f, o in zip(fs, offsets[n])] for n, fs in features(p, x).items()}
    with mock.patch.object(objective, 'teacher_features', shifted), \
         mock.patch.object(objective, 'decode', lambda *a, **k: decode(*a, **k) + pred_offset):
      return objective.loss_fn({**params, **frozen_params}, batch, jax.random.key(1))

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(features, frozen_params | params, batch['image']))
  pred_zeros = jnp.zeros(jax.eval_shape(decode, params, *objective.encode(params, batch['image'], jnp.zeros(
      mask.shape))[:1], jnp.zeros(mask.shape, jnp.int32)).shape)
  value, metrics = jax.jit(loss)(zeros, pred_zeros)
  assert set(metrics) == {'loss/reconstruction', 'loss/mimic_clip', 'loss/mimic_dino'}
  np.testing.assert_allclose(value, metrics['loss/reconstruction'] + 0.5 * metrics['loss/mimic_clip']
                             + metrics['loss/mimic_dino'], rtol=1e-6)
  # The pixel loss: its gradient w.r.t. the predictions is zero at every visible patch, not at a masked one.
  g = np.abs(np.asarray(jax.jit(jax.grad(lambda p: loss(zeros, p)[0]))(pred_zeros))).sum(-1)
  assert np.all(g[mask == 0] == 0) and np.all(g[mask == 1] > 0)
  # The mimic terms (their targets are stop-gradient, so by value): any change of every teacher's targets at the
  # masked patches leaves the loss exactly as it was; at the visible ones (or the cls token, where mimicked) not.
  jitted = jax.jit(loss)
  noise = jax.tree.map(lambda z: 10.0 * jax.random.normal(jax.random.key(2), z.shape), zeros)
  where = lambda rows: jax.tree.map(lambda n: n * jnp.asarray(rows, jnp.float32)[..., None], noise)
  cls = np.zeros((mask.shape[0], 1))
  at_masked, at_visible = np.concatenate([cls, mask], 1), np.concatenate([cls, 1 - mask], 1)
  np.testing.assert_array_equal(jitted(where(at_masked), pred_zeros)[0], value)
  _, moved = jitted(where(at_visible), pred_zeros)
  assert all(moved[f'loss/mimic_{n}'] != metrics[f'loss/mimic_{n}'] for n in ('clip', 'dino'))
  assert moved['loss/reconstruction'] == metrics['loss/reconstruction']
  _, moved = jitted(where(np.concatenate([cls + 1, 0 * mask], 1)), pred_zeros)  # the cls token: DINO's only
  assert moved['loss/mimic_clip'] == metrics['loss/mimic_clip'] and moved['loss/mimic_dino'] != metrics['loss/mimic_dino']


@pytest.mark.slow
def test_the_teachers_are_outside_the_state_never_differentiated_and_unchanged_by_a_step(tmp_path):
  from mae_jax import sharding, train
  c = pico_config(tmp_path)
  trainer = train.Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  assert set(state['params']) == {'encoder', 'decoder', 'mimic_clip', 'mimic_dino'}
  assert set(trainer.frozen) == {'teacher_clip', 'teacher_dino'}
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(state['opt_state']) <= 2 * count(state['params']) + 16  # AdamW's moments: the student's only
  objective = trainer.objective
  before = jax.device_get(trainer.frozen)
  batch = example_batch(c, n=c.train.batch_size)
  features = jax.jit(objective.teacher_features)
  targets = jax.device_get(features(trainer.frozen, batch['image']))
  # Even asked for, the gradient w.r.t. a teacher is zero: its params enter the loss behind a stop-gradient.
  teacher_grads = jax.jit(jax.grad(lambda f: objective.loss_fn({**state['params'], **f}, batch,
                                                               jax.random.key(0))[0]))(trainer.frozen)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(teacher_grads))
  for step_batch in trainer.loader.iterate(0, 2, prefetch=0):
    state, metrics = trainer.train_step(state, sharding.global_batch(step_batch, trainer.mesh))
  assert np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.frozen), before)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(features(trainer.frozen, batch['image'])), targets)


@pytest.mark.slow
def test_a_tiny_run_mimics_a_teacher_the_project_pretrained(tmp_path):
  """The CPU demo's two commands, shortened: a short MAE run, then MR-MAE with its encoder as the teacher (read
  from the run's workdir); both terms fall and the metrics name them."""
  from conftest import QUICK, run_main

  from mae_jax import metrics
  teacher = str(tmp_path / 'mae')
  run_main(*QUICK, '--config.train.num_steps=10', f'--workdir={teacher}', check=True)
  workdir = str(tmp_path / 'mr_mae')
  result = run_main('--config=configs/mr_mae_tiny_cpu.py', f'--workdir={workdir}', '--config.data.eval_split=',
                    f'--config.mr_mae.teachers.mae.init_from={teacher}', '--config.train.num_steps=60',
                    '--config.log.every_steps=10', '--config.log.images_every_steps=1000', check=True)
  assert 'Done: 60 steps' in result.stdout
  records = [r for r in metrics.read_jsonl(workdir) if 'loss' in r]
  for name in ('loss/reconstruction', 'loss/mimic_mae'):
    assert records[-1][name] < records[0][name], (name, [r[name] for r in records])


@pytest.mark.parametrize('scheme', [pytest.param('alternating', marks=pytest.mark.slow), 'joint'])
def test_mimic_composes_with_gan_mae(tmp_path, scheme):
  """Objective mr_gan_mae: GAN-MAE's loss (and generator phase) plus the mimic terms, the heads trained by the
  generator's update; the discriminator's phase is GAN-MAE's own."""
  from mae_jax import objectives
  c = pico_config(tmp_path)
  c.objective = 'mr_gan_mae'
  c.gan_mae.update_scheme = scheme
  objective, params, frozen_params = objective_and_params(c)
  gan = objectives.GANMAE(c)
  batch, rng = example_batch(c), jax.random.key(1)
  merged = {**params, **frozen_params}
  loss, metrics = jax.jit(lambda p: objective.loss_fn(p, batch, rng))(merged)
  gan_loss, gan_metrics = jax.jit(lambda p: gan.loss_fn(p, batch, rng))(params)
  mimic = 0.5 * metrics['loss/mimic_clip'] + metrics['loss/mimic_dino']
  np.testing.assert_allclose(loss, gan_loss + mimic, rtol=1e-5)
  assert set(metrics) == set(gan_metrics) | {'loss/mimic_clip', 'loss/mimic_dino'}
  trainable = objective.trainable(params)
  if scheme == 'joint':
    assert all(jax.tree.leaves(trainable))
    return
  assert [p.name for p in objective.update_phases()] == ['generator', 'discriminator']
  assert all(jax.tree.leaves(trainable['generator']['mimic_clip'])) and not any(
      jax.tree.leaves(trainable['discriminator']['mimic_dino']))
  g_loss, _ = jax.jit(lambda p: objective.generator_loss(p, batch, rng))(merged)
  np.testing.assert_allclose(g_loss, jax.jit(lambda p: gan.generator_loss(p, batch, rng))(params)[0] + mimic, rtol=1e-5)


def test_mimic_only_has_no_decoder_and_no_pixel_loss(tmp_path):
  """MaskAlign's setting (configs/maskalign_vitb.py): the loss is the weighted mimic terms alone."""
  c = pico_config(tmp_path, mimic_only=True)
  objective, params, frozen_params = objective_and_params(c)
  assert set(params) == {'encoder', 'mimic_clip', 'mimic_dino'}
  batch = example_batch(c)
  loss, metrics = jax.jit(lambda p: objective.loss_fn(p, batch, jax.random.key(0)))({**params, **frozen_params})
  assert set(metrics) == {'loss/mimic_clip', 'loss/mimic_dino'}
  np.testing.assert_allclose(loss, 0.5 * metrics['loss/mimic_clip'] + metrics['loss/mimic_dino'], rtol=1e-6)
  assert objective.visualize(params, batch['image'], jax.random.key(0)) is None
