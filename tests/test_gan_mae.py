"""GAN-MAE: the discriminator's input, the shared encoder, gradient routing of both update schemes, the
adaptive weight, the update-phase seam of the train step, configs, and a short real training run."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config

from mae_jax import config as config_lib
from mae_jax import objectives, optim, sharding, train
from mae_jax.models.patchify import patchify
from mae_jax.objectives.base import PhaseTrainable
from mae_jax.objectives.gan_mae import GANMAE, adversarial_loss

sg = jax.lax.stop_gradient


@pytest.fixture(autouse=True)
def _fp32_matmuls():
  with jax.default_matmul_precision('highest'):
    yield


def tiny_config(variant='pico/4', **gan_mae):
  """pico/4 (or ConvMAE's convpico/4, no cls token) on 16x16 images: 16 patches, 4 visible; a 1-block decoder."""
  c = load_config('gan_mae_tiny_cpu')
  c.model.variant = variant
  c.model.decoder.update(width=32, depth=1, num_heads=2)
  c.data.img_size = 16
  c.gan_mae.update(gan_mae)
  config_lib.validate(c)
  return c


@functools.cache
def setup(variant='pico/4', **gan_mae):
  config = tiny_config(variant, **gan_mae)
  objective = objectives.create(config)
  params = objective.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  keys = jax.random.key_data(jax.random.split(jax.random.key(2), 4))
  return objective, params, {'image': images, 'example_key': keys}


def leaves_are_zero(tree):
  return all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def leaves_are_nonzero(tree):
  return all(np.any(np.asarray(x)) for x in jax.tree.leaves(tree))


def test_discriminator_sees_originals_at_visible_patches_and_predictions_at_masked_ones(monkeypatch):
  objective, params, batch = setup()
  seen = []
  discriminate = objective.discriminate

  def recording(p, images, *args, **kwargs):
    jax.debug.callback(lambda x: seen.append(np.asarray(x)), images)  # primal values, also under vjp/jit
    return discriminate(p, images, *args, **kwargs)

  monkeypatch.setattr(objective, 'discriminate', recording)
  both = lambda p: (objective.loss_fn(p, batch, jax.random.key(3)),  # joint: the adversarial and the disc term
                    objective.discriminator_loss(p, batch, jax.random.key(3)))  # alternating's D phase
  jax.block_until_ready(jax.jit(both)(params))
  assert len(seen) == 3

  pred, mask = jax.jit(objective.forward)(params, batch['image'], objective.sample_noise(batch['example_key']))
  mask, pred = np.asarray(mask, bool), np.asarray(pred)
  target = np.asarray(patchify(batch['image'], 4))
  assert mask.sum() == 4 * 12 and not np.allclose(pred[mask], target[mask])
  for image in seen:
    assert image.shape == batch['image'].shape  # every patch, no masking
    patches = np.asarray(patchify(image, 4))
    np.testing.assert_array_equal(patches[~mask], target[~mask])
    np.testing.assert_allclose(patches[mask], pred[mask], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_one_encoder_param_tree_serves_generator_and_discriminator():
  objective, params, batch = setup()
  assert set(params) == {'encoder', 'decoder', 'disc_head'}
  assert jax.tree.map(np.shape, params['disc_head']) == {'kernel': (32, 1), 'bias': (1,)}
  mae = objectives.create(_mae_config())
  mae_params = jax.eval_shape(mae.init, jax.random.key(0))
  count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))
  assert count(params) == count(mae_params) + 32 + 1  # nothing but the head is added

  # Both players read params['encoder']: changing it changes the generator's and the discriminator's outputs.
  noise = objective.sample_noise(batch['example_key'])
  outputs = jax.jit(lambda p: (objective.forward(p, batch['image'], noise)[0], objective.discriminate(p, batch['image'])))
  bumped = {**params, 'encoder': jax.tree.map(lambda x: x + 0.05, params['encoder'])}
  for before, after in zip(outputs(params), outputs(bumped)):
    assert not np.allclose(before, after)
  # ... and both the generator's and the discriminator's losses train it (joint_term_grads checks the rest).
  grads, _ = joint_term_grads()
  for name in ('reconstruction', 'discriminator'):
    assert leaves_are_nonzero(grads[name]['encoder']['blocks_0'])


def _mae_config():
  c = tiny_config()
  c.objective = 'mae'
  return c


@functools.cache
def joint_term_grads(through_encoder=False, variant='pico/4'):
  """({term name: its gradient tree}, metrics) of the joint objective, in one compiled jacobian."""
  objective, params, batch = setup(variant, update_scheme='joint', adv_through_disc_encoder=through_encoder)
  return jax.jit(jax.jacrev(lambda p: objective.loss_terms(p, batch, jax.random.key(3)), has_aux=True))(params)


@pytest.mark.parametrize('through_encoder', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_joint_routes_each_term_to_its_player_only(through_encoder):
  objective, params, batch = setup(update_scheme='joint', adv_through_disc_encoder=through_encoder)
  rng = jax.random.key(3)
  grads, metrics = joint_term_grads(through_encoder)

  disc = grads['discriminator']
  assert leaves_are_zero(disc['decoder'])  # exactly: the generated pixels are stop-gradient
  assert leaves_are_nonzero(disc['disc_head']) and leaves_are_nonzero(disc['encoder']['blocks_0'])

  adv = grads['adversarial']
  assert leaves_are_zero(adv['disc_head'])  # exactly: the discriminator is held fixed in the adversarial term
  assert leaves_are_nonzero(adv['decoder']['decoder_pred']) and leaves_are_nonzero(adv['encoder']['blocks_0'])
  assert leaves_are_zero(grads['reconstruction']['disc_head'])

  # The vjp + surrogate gradient equals plain autodiff of weight * L_adv through a frozen discriminator.
  weight = metrics['gan/adv_weight']
  noise = objective.sample_noise(batch['example_key'])
  gen_rng, disc_rng = jax.random.split(rng)

  def reference(p):
    pred, mask = objective.forward(p, batch['image'], noise, gen_rng, True)
    frozen = {'encoder': p['encoder'] if through_encoder else sg(p['encoder']), 'disc_head': sg(p['disc_head'])}
    images = objective.corrupt(patchify(batch['image'], 4), pred, mask)
    return weight * adversarial_loss(objective.discriminate(frozen, images, disc_rng, True), mask)

  expected = jax.jit(jax.grad(reference))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), adv, expected)


# ConvMAE's encoder has no cls token: no prefix row to drop from the discriminator's tokens or the decoder's hidden.
@pytest.mark.parametrize('variant', ['pico/4', pytest.param('convpico/4', marks=pytest.mark.slow)])
def test_adaptive_weight_is_vqgans_gradient_norm_ratio_at_decoder_pred(variant):
  objective, params, batch = setup(variant, update_scheme='joint', adv_through_disc_encoder=False)
  rng = jax.random.key(3)
  _, metrics = joint_term_grads(variant=variant)
  noise = objective.sample_noise(batch['example_key'])
  gen_rng, disc_rng = jax.random.split(rng)
  target = patchify(batch['image'], 4)

  def losses(kernel):
    p = {**params, 'decoder': {**params['decoder'], 'decoder_pred': {**params['decoder']['decoder_pred'],
                                                                     'kernel': kernel}}}
    pred, mask = objective.forward(p, batch['image'], noise, gen_rng, True)
    rec = jnp.sum(jnp.mean((pred - target) ** 2, -1) * mask) / jnp.sum(mask)
    logits = objective.discriminate(params, objective.corrupt(target, pred, mask), disc_rng, True)
    assert logits.shape == mask.shape == (4, 16)  # one logit per patch
    return rec, adversarial_loss(logits, mask)

  kernel = params['decoder']['decoder_pred']['kernel']
  rec_grad, adv_grad = jax.jit(jax.jacrev(losses))(kernel)
  expected = objective.adv_weight * np.clip(np.linalg.norm(rec_grad) / (np.linalg.norm(adv_grad) + 1e-4), 0, 1e4)
  np.testing.assert_allclose(float(metrics['gan/adv_weight']), expected, rtol=1e-4)
  assert 0 < expected < 1e4

  constant, _, _ = setup(adv_weight_mode='constant', adv_weight=0.25)
  assert float(constant.adversarial_weight(None, None, None, None, None)) == 0.25


def constant_schedule(step):
  return jnp.full((), 1e-3)


@pytest.mark.slow
def test_alternating_declares_two_phases_whose_optimizers_move_only_their_groups():
  objective, params, _ = setup()
  assert [p.name for p in objective.update_phases()] == ['generator', 'discriminator']
  owned = objective.trainable(params)
  assert isinstance(owned, PhaseTrainable) and set(owned) == {'generator', 'discriminator'}
  groups = {phase: {name for name, tree in masks.items() if all(jax.tree.leaves(tree))}
            for phase, masks in owned.items()}
  assert groups == {'generator': {'encoder', 'decoder'}, 'discriminator': {'encoder', 'disc_head'}}

  tx = optim.create(tiny_config(), constant_schedule, owned)
  state = tx.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update, static_argnames='phase')
  for phase, moved, kept in [('generator', ('encoder', 'decoder'), 'disc_head'),
                             ('discriminator', ('encoder', 'disc_head'), 'decoder')]:
    updates, new_state = update(ones, state, params, phase=phase)
    assert all(leaves_are_nonzero(updates[name]) for name in moved) and leaves_are_zero(updates[kept])
    other = 'discriminator' if phase == 'generator' else 'generator'
    jax.tree.map(np.testing.assert_array_equal, new_state[other], state[other])  # left alone
    counts = [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(new_state[phase], 'count')]
    assert counts and all(c == 1 for c in counts)  # this phase's AdamW (and schedule) counted one step
  with pytest.raises(KeyError, match='no optimizer for update phase'):
    tx.update(ones, state, params, phase='critic')


@pytest.mark.slow
def test_alternating_step_is_a_generator_update_then_a_discriminator_update():
  objective, params, batch = setup()
  # Plain gradient descent per phase (AdamW's first step is sign(g), which amplifies rounding noise), with
  # the phases' param groups as the objective declares them.
  sgd = lambda mask: optax.multi_transform({'train': optax.sgd(0.1), 'frozen': optax.set_to_zero()},
                                           jax.tree.map(lambda t: 'train' if t else 'frozen', mask))
  tx = optim.per_phase({name: sgd(mask) for name, mask in objective.trainable(params).items()})
  step = jax.jit(train.make_train_step(objective, tx, constant_schedule))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'rng': jax.random.key_data(jax.random.key(7))}
  new_state, metrics = step(state, {'image': batch['image']})

  # The same thing by hand, with the step's keys: the generator phase, then the discriminator phase at the
  # params the generator phase left. Run in the other order, the result differs.
  rng = jax.random.fold_in(jax.random.key(7), 0)
  example_rng, rng = jax.random.split(rng)
  hand_batch = train.with_example_keys({'image': batch['image']}, example_rng)
  phases = list(enumerate(objective.update_phases()))
  grads = {phase.name: jax.jit(jax.grad(lambda q, f=phase.loss_fn, i=index: f(q, hand_batch,
                                                                             jax.random.fold_in(rng, i))[0]))
           for index, phase in phases}
  results = []
  for order in (phases, phases[::-1]):
    p, opt_state = params, tx.init(params)
    for _, phase in order:
      updates, opt_state = tx.update(grads[phase.name](p), opt_state, p, phase=phase.name)
      p = optax.apply_updates(p, updates)
    results.append(p)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), new_state['params'], results[0])
  kernel = lambda p: p['encoder']['blocks_0']['attn']['qkv']['kernel']
  assert not np.allclose(kernel(results[1]), kernel(results[0]), rtol=1e-4, atol=1e-6)

  for name, leaf in (('encoder', 'cls_token'), ('decoder', 'mask_token'), ('disc_head', 'bias')):
    assert not np.allclose(new_state['params'][name][leaf], params[name][leaf]), name
  for key in ('loss', 'loss/phase_generator', 'loss/phase_discriminator', 'grad_norm/generator',
              'grad_norm/discriminator', 'loss/reconstruction', 'loss/adversarial', 'loss/discriminator',
              'gan/adv_weight', 'gan/disc_balanced_acc'):
    assert np.isfinite(float(metrics[key])), key
  np.testing.assert_allclose(float(metrics['loss']),
                             float(metrics['loss/phase_generator']) + float(metrics['loss/phase_discriminator']),
                             rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('update_scheme', ['alternating', 'joint'])
def test_grad_accumulation_gives_the_same_step_with_phases(update_scheme):
  objective, params, batch = setup(update_scheme=update_scheme, adv_weight_mode='constant')
  tx = optim.create(tiny_config(), constant_schedule, objective.trainable(params))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'rng': jax.random.key_data(jax.random.key(7))}
  out = {}
  for accum in (1, 2):
    step = jax.jit(train.make_train_step(objective, tx, constant_schedule, grad_accum_steps=accum))
    out[accum] = jax.device_get(step(state, {'image': batch['image']})[1])
  for key in out[1]:
    if key.startswith(('loss', 'grad_norm')):
      np.testing.assert_allclose(out[2][key], out[1][key], rtol=1e-4, err_msg=key)


def test_single_phase_objectives_keep_one_optimizer():
  objective, params, _ = setup(update_scheme='joint')
  mae = objectives.create(_mae_config())
  for obj in (objective, mae):
    assert [p.name for p in obj.update_phases()] == ['train']
    trainable = obj.trainable(params)
    assert not isinstance(trainable, PhaseTrainable)
    state = optim.create(tiny_config(), constant_schedule, trainable).init(params)
    assert set(state.inner_states) == {'train', 'frozen'}  # optax.multi_transform, as before the seam


@pytest.mark.parametrize('field,value,message', [
    ('mae.norm_pix_loss', True, 'norm_pix_loss=True does not work with GAN-MAE'),
    ('gan_mae.update_scheme', 'both', 'update_scheme'),
    ('gan_mae.adv_weight_mode', 'fixed', 'adv_weight_mode'),
    ('gan_mae.disc_loss', 'hinge', 'disc_loss'),
    ('gan_mae.disc_weight', 0.0, 'disc_weight'),
])
def test_validate_names_the_bad_gan_mae_field(field, value, message):
  config = load_config('gan_mae_tiny_cpu')
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_vitb_config_is_maes_recipe_for_200_epochs_plus_a_769_param_head():
  gan, mae = load_config('gan_mae_vitb'), load_config('mae_vitb')
  config_lib.validate(gan)
  assert gan.train.epochs == 200 and not gan.mae.norm_pix_loss and gan.objective == 'gan_mae'
  assert gan.train.to_dict() == {**mae.train.to_dict(), 'epochs': 200}
  assert gan.model.to_dict() == mae.model.to_dict()
  count = lambda c: sum(math.prod(x.shape) for x in jax.tree.leaves(
      jax.eval_shape(objectives.create(c).init, jax.random.key(0))))
  assert count(gan) == 111_655_680 + 769


@pytest.mark.slow
def test_short_tiny_training_run_has_finite_losses():
  config = tiny_config()
  config.train.update(batch_size=16, num_steps=6)
  config.data.eval_split = ''
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  state = trainer.init_state()
  head = np.asarray(state['params']['disc_head']['kernel'])
  for local_batch in trainer.loader.iterate(0, 6, prefetch=0):
    state, metrics = trainer.train_step(state, sharding.global_batch(local_batch, trainer.mesh))
    values = jax.device_get(metrics)
    assert all(np.isfinite(v) for v in values.values()), values
  assert int(state['step']) == 6 and not np.allclose(head, state['params']['disc_head']['kernel'])
  assert {'loss/reconstruction', 'loss/adversarial', 'loss/discriminator', 'gan/adv_weight', 'gan/disc_acc_real',
          'gan/disc_acc_fake', 'gan/disc_balanced_acc'} <= set(values)
  assert isinstance(trainer.objective, GANMAE)


@pytest.mark.parametrize('suffix', [pytest.param('.pth', marks=pytest.mark.slow), '.safetensors'])
def test_gan_mae_exports_with_its_discriminator_head_and_round_trips_bitwise(tmp_path, suffix):
  pytest.importorskip('torch')
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  config = load_config('gan_mae_tiny_cpu')
  params = objectives.create(config).init(jax.random.key(0))
  state_dict = export.export_state_dict(params, config, 'gan-mae')
  assert tuple(state_dict['disc_head.weight'].shape) == (1, 64) and 'decoder_pred.weight' in state_dict
  export.save(state_dict, tmp_path / f'gan{suffix}', 'gan-mae')
  back = export.import_state_dict(export.load_state_dict(tmp_path / f'gan{suffix}'), config, 'gan-mae')
  assert set(back) == {'encoder', 'decoder', 'disc_head'}
  same = jax.tree.map(lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(), back, params)
  assert all(jax.tree.leaves(same))
