"""Parameter groups as configuration: the reference's layer-wise lr decay and no-decay rules, AdamW / SGD / LARS
against torch, frozen rules, the unchanged default layout, and config validation."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mae_jax import config as config_lib
from mae_jax import optim
from mae_jax.models import vit

FINETUNE_WD = (('encoder/(pos_embed|cls_token)', 0.0),)  # MAE fine-tuning: no_weight_decay_list


def make_config(weight_decay=0.05, grad_clip=0.0, **optim_fields):
  c = config_lib.base_config()
  c.train.update(b1=0.9, b2=0.999, weight_decay=weight_decay, grad_clip=grad_clip)
  c.optim.update(optim_fields)
  return c


def finetune_tree(img_size, patch_size, width, depth, num_heads, num_classes):
  """init(rng) of the fine-tuned classifier's params in timm's VisionTransformer(global_pool='avg',
  fc_norm=True) layout: learned pos_embed, fc_norm, head."""
  model = vit.ViT(img_size=img_size, patch_size=patch_size, width=width, depth=depth, num_heads=num_heads,
                  posemb='learned', pool='gap', num_classes=num_classes)
  return lambda rng: model.init(rng, jnp.zeros((1, img_size, img_size, 3)))['params']


def timm_model(img_size, patch_size, width, depth, num_heads, num_classes):
  with torch.device('meta'):  # names and shapes only
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=width, depth=depth,
                             num_heads=num_heads, global_pool='avg', fc_norm=True, num_classes=num_classes)


def torch_name(path):
  """'encoder/blocks_3/attn/qkv/kernel' -> 'blocks.3.attn.qkv.weight', 'encoder/fc_norm/scale' -> 'fc_norm.weight'."""
  name = re.sub(r'blocks_(\d+)', r'blocks.\1', path.removeprefix('encoder/')).replace('/', '.')
  return re.sub(r'\.(kernel|scale)$', '.weight', name)


def reference_groups(named_ndims, weight_decay, no_weight_decay_list, layer_decay):
  """util/lr_decay.py `param_groups_lrd`, per parameter: {name: (lr_scale, weight_decay)}."""
  named_ndims = list(named_ndims)
  num_layers = len({n.split('.')[1] for n, _ in named_ndims if n.startswith('blocks.')}) + 1

  def layer_id(name):
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
      return 0
    if name.startswith('blocks'):
      return int(name.split('.')[1]) + 1
    return num_layers

  return {name: (layer_decay ** (num_layers - layer_id(name)),
                 0.0 if ndim == 1 or name in no_weight_decay_list else weight_decay)
          for name, ndim in named_ndims}


def flat(tree):
  return {jax.tree_util.keystr(k, simple=True, separator='/'): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_layer_decay_and_no_decay_groups_match_the_reference_for_vit_b():
  init = finetune_tree(224, 16, 768, 12, 12, 1000)
  params = {'encoder': jax.eval_shape(init, jax.random.key(0))}
  config = make_config(wd_mults=FINETUNE_WD, layer_decay=0.65)
  lr_scale, wd_scale = map(flat, optim.param_multipliers(config, params))
  ours = {torch_name(path): (lr_scale[path], wd_scale[path]) for path in lr_scale}
  assert len(ours) == len(lr_scale)  # one torch name per leaf

  model = timm_model(224, 16, 768, 12, 12, 1000)
  reference = reference_groups(((n, p.ndim) for n, p in model.named_parameters()), 0.05,
                               {'pos_embed', 'cls_token'}, 0.65)
  assert set(ours) == set(reference)
  for name, (scale, decay) in reference.items():
    assert ours[name][0] == pytest.approx(scale, rel=1e-12), name
    assert (ours[name][1] > 0) == (decay > 0), name
  assert reference['blocks.0.attn.qkv.weight'][0] == pytest.approx(0.65 ** 12)  # the test is not vacuous
  assert ours['head.weight'] == (1.0, 1.0) and ours['cls_token'] == (0.65 ** 13, 0.0)


def test_token_stem_is_layer_zero_and_other_modules_the_last_layer():
  tree = {'encoder': {'token_embed': {'embedding': jnp.zeros((8, 4))}, 'blocks_0': {'w': jnp.zeros((4, 4))},
                      'blocks_1': {'w': jnp.zeros((4, 4))}, 'norm': {'scale': jnp.zeros(4)}},
          'decoder': {'decoder_blocks_0': {'w': jnp.zeros((4, 4))}}}
  lr, _ = optim.param_multipliers(make_config(layer_decay=0.5), tree)
  assert lr['encoder']['token_embed']['embedding'] == 0.125 and lr['encoder']['blocks_1']['w'] == 0.5
  assert lr['encoder']['norm']['scale'] == lr['decoder']['decoder_blocks_0']['w'] == 1.0


def test_convvit_layer_decay_matches_convmae_lr_decay():
  """ConvMAE's util/lr_decay.py: patch_embed1-4 and the conv stages blocks1/blocks2 are layer 0, blocks3.i is
  layer i + 1 of len(blocks3) + 1, the rest (fc_norm, head) the last layer."""
  config = config_lib.base_config()
  config.model.variant = 'convB/16'  # shapes only
  model = vit.encoder_from_config(config.model, 224, posemb='learned', pool='gap', num_classes=10)
  params = {'encoder': jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']}
  lr_scale = flat(optim.param_multipliers(make_config(layer_decay=0.5), params)[0])
  names = {re.sub(r'(blocks\d)_(\d+)', r'\1.\2', path.removeprefix('encoder/')).replace('/', '.'): scale
           for path, scale in lr_scale.items()}
  num_layers = len({n.split('.')[1] for n in names if n.startswith('blocks3.')}) + 1

  def layer_id(name):
    if name in ('cls_token', 'pos_embed') or name.startswith(('patch_embed', 'blocks1', 'blocks2')):
      return 0
    return int(name.split('.')[1]) + 1 if name.startswith('blocks3') else num_layers

  assert num_layers > 2 and any(n.startswith('blocks1.') for n in names)
  for name, scale in names.items():
    assert scale == pytest.approx(0.5 ** (num_layers - layer_id(name)), rel=1e-12), name


def run_jax(config, schedule, params, grads, trainable=None):
  trainable = jax.tree.map(lambda _: True, params) if trainable is None else trainable
  tx = optim.create(config, schedule, trainable)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def run_torch(optimizer_fn, groups, params, grads, lrs):
  """groups: {path: (lr_scale, weight_decay)}; one torch param group per leaf; lr set per step like MAE's
  lr_sched (param_group['lr'] = lr * lr_scale)."""
  tensors = {path: torch.tensor(np.asarray(p), requires_grad=True) for path, p in flat(params).items()}
  opt = optimizer_fn([{'params': [t], 'lr_scale': groups[path][0], 'weight_decay': groups[path][1]}
                      for path, t in tensors.items()])
  for g, lr in zip(grads, lrs):
    for path, gradient in flat(g).items():
      tensors[path].grad = torch.tensor(np.asarray(gradient))
    for group in opt.param_groups:
      group['lr'] = lr * group['lr_scale']
    opt.step()
  return {path: t.detach().numpy() for path, t in tensors.items()}


def assert_close(jax_params, torch_params, atol=1e-6):
  got = flat(jax_params)
  assert set(got) == set(torch_params)
  for path, value in torch_params.items():
    np.testing.assert_allclose(np.asarray(got[path]), value, rtol=0, atol=atol, err_msg=path)


def small_finetune_problem(steps=3):
  init = finetune_tree(16, 4, 32, 2, 2, 10)
  params = {'encoder': init(jax.random.key(0))}
  params = jax.tree.map(lambda p, k: p + 0.1 * jax.random.normal(k, p.shape),  # no all-zero leaves
                        params, optax.tree_utils.tree_split_key_like(jax.random.key(1), params))
  grads = [jax.tree.map(lambda p, k: jax.random.normal(k, p.shape),
                        params, optax.tree_utils.tree_split_key_like(jax.random.key(2 + s), params))
           for s in range(steps)]
  return params, grads


LRS = [1e-3, 3e-3, 2e-3]
schedule = lambda count: jnp.asarray(LRS)[count]


@pytest.mark.slow
def test_adamw_step_matches_torch_with_the_reference_groups():
  params, grads = small_finetune_problem()
  model = timm_model(16, 4, 32, 2, 2, 10)
  reference = reference_groups(((n, p.ndim) for n, p in model.named_parameters()), 0.05,
                               {'pos_embed', 'cls_token'}, 0.65)
  groups = {path: reference[torch_name(path)] for path in flat(params)}
  assert len(set(groups.values())) > 4  # several lr scales, decayed and not
  ours, _ = run_jax(make_config(weight_decay=0.05, wd_mults=FINETUNE_WD, layer_decay=0.65), schedule, params, grads)
  theirs = run_torch(lambda g: torch.optim.AdamW(g, betas=(0.9, 0.999), eps=1e-8), groups, params, grads, LRS)
  assert_close(ours, theirs)


class TorchLARS(torch.optim.Optimizer):
  """MAE's util/lars.py as described in the spec (1.8): decay and trust ratio for >1-D params only, then
  momentum, then the learning rate."""

  def __init__(self, params, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=0.0, weight_decay=0.0, momentum=momentum, trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group['params']:
        dp = p.grad
        if p.ndim > 1:
          dp = dp + group['weight_decay'] * p
          p_norm, dp_norm = torch.norm(p), torch.norm(dp)
          ratio = group['trust_coefficient'] * p_norm / dp_norm if p_norm > 0 and dp_norm > 0 else 1.0
          dp = dp * ratio
        mu = self.state[p].setdefault('mu', torch.zeros_like(p))
        mu.mul_(group['momentum']).add_(dp)
        p.add_(mu, alpha=-group['lr'])


def linear_probe_problem():
  keys = jax.random.split(jax.random.key(3), 8)
  params = {'head': {'kernel': jax.random.normal(keys[0], (16, 5)), 'bias': jnp.zeros(5)},
            'zero': {'kernel': jnp.zeros((4, 3))},  # ||p|| = 0: trust ratio 1
            'tok': jax.random.normal(keys[1], (1, 2, 3))}
  grads = [jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), params,
                        optax.tree_utils.tree_split_key_like(keys[2 + s], params)) for s in range(3)]
  return params, grads


def test_lars_matches_the_reference_with_a_changing_lr():
  params, grads = linear_probe_problem()
  ours, _ = run_jax(make_config(weight_decay=0.05, name='lars', momentum=0.9, trust_coefficient=0.001),
                    schedule, params, grads)
  groups = {path: (1.0, 0.05) for path in flat(params)}  # the reference decays only >1-D params itself
  theirs = run_torch(lambda g: TorchLARS(g, momentum=0.9, trust_coefficient=0.001), groups, params, grads, LRS)
  assert_close(ours, theirs)
  assert not np.allclose(ours['zero']['kernel'], 0)


def test_sgd_matches_torch_with_lr_and_decay_multipliers():
  params, grads = linear_probe_problem()
  config = make_config(weight_decay=0.05, name='sgd', momentum=0.8, wd_mults=(('tok', 0.5),),
                       lr_mults=(('head/.*', 2.0),))
  ours, _ = run_jax(config, schedule, params, grads)
  lr_scale, wd_scale = map(flat, optim.param_multipliers(config, params))
  assert wd_scale == {'head/kernel': 1.0, 'head/bias': 0.0, 'zero/kernel': 1.0, 'tok': 0.5}
  groups = {path: (lr_scale[path], 0.05 * wd_scale[path]) for path in lr_scale}
  theirs = run_torch(lambda g: torch.optim.SGD(g, lr=0.0, momentum=0.8), groups, params, grads, LRS)
  assert_close(ours, theirs)


@pytest.mark.slow
def test_frozen_rules_leave_params_unchanged_and_without_state():
  params, grads = small_finetune_problem(steps=2)
  trainable = jax.tree.map(lambda _: True, params)
  trainable['encoder']['head']['bias'] = False  # the objective's own frozen leaf
  config = make_config(frozen=('encoder/blocks_0/.*', 'encoder/cls_token'), layer_decay=0.75)
  combined = flat(optim.trainable_leaves(config, trainable))
  frozen = {path for path, on in combined.items() if not on}
  blocks_0 = {p for p in combined if p.startswith('encoder/blocks_0/')}
  assert frozen == {'encoder/cls_token', 'encoder/head/bias'} | blocks_0

  new, state = run_jax(config, schedule, params, grads, trainable)
  old, new = flat(params), flat(new)
  for path in combined:
    assert np.array_equal(old[path], new[path]) == (path in frozen), path
  # Adam's moments hold the trainable leaves only; the frozen ones are empty MaskedNodes.
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  for moments in (adam[0].mu, adam[0].nu):
    assert set(flat(moments)) == {p for p in combined if p not in frozen}
  trainable_size = sum(np.size(old[p]) for p in combined if p not in frozen)
  assert sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x)) == 2 * trainable_size

  phases = optim.PhaseTrainable(a=trainable, b=jax.tree.map(lambda _: True, params))
  combined_phases = optim.trainable_leaves(config, phases)
  assert isinstance(combined_phases, optim.PhaseTrainable) and not flat(combined_phases['b'])['encoder/cls_token']
  tx = optim.create(config, schedule, phases)
  updates, _ = tx.update(grads[0], tx.init(params), params, phase='b')
  assert not np.any(flat(updates)['encoder/cls_token']) and np.all(flat(updates)['encoder/head/bias'] != 0)


def old_create(train_config, schedule, trainable):
  """The optimizer before config.optim existed, whose state layout the checkpoints in tests/data hold."""
  adamw = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2, eps=1e-8,
                      weight_decay=train_config.weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  if train_config.grad_clip > 0:
    adamw = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  labels = jax.tree.map(lambda t: 'train' if t else 'frozen', trainable)
  return optax.multi_transform({'train': adamw, 'frozen': optax.set_to_zero()}, labels)


@pytest.mark.parametrize('grad_clip', [0.0, 1.0])
def test_default_config_is_the_old_adamw_exactly(grad_clip):
  params, grads = small_finetune_problem(steps=2)
  trainable = jax.tree.map(lambda _: True, params)
  trainable['encoder']['blocks_1']['mlp']['fc1']['kernel'] = False
  config = make_config(grad_clip=grad_clip)
  new, old = optim.create(config, schedule, trainable), old_create(config.train, schedule, trainable)
  new_state, old_state = new.init(params), old.init(params)
  assert jax.tree.structure(new_state) == jax.tree.structure(old_state)
  for g in grads:
    new_updates, new_state = new.update(g, new_state, params)
    old_updates, old_state = old.update(g, old_state, params)
    jax.tree.map(np.testing.assert_array_equal, (new_updates, new_state), (old_updates, old_state))
    assert jax.tree.structure(new_state) == jax.tree.structure(old_state)


@pytest.mark.parametrize('field,value,message', [
    ('name', 'adam', 'config.optim.name'),
    ('eps', 0.0, 'config.optim.eps'),
    ('momentum', 1.0, 'config.optim.momentum'),
    ('trust_coefficient', -1.0, 'config.optim.trust_coefficient'),
    ('layer_decay', 0.0, 'config.optim.layer_decay'),
    ('layer_decay', 1.5, 'config.optim.layer_decay'),
    ('wd_mults', (('encoder/(pos_embed', 0.0),), 'config.optim.wd_mults: bad regex'),
    ('wd_mults', (('encoder/.*', -1.0),), 'config.optim.wd_mults: multiplier'),
    ('lr_mults', ('head', 2.0), 'config.optim.lr_mults'),  # a pair, not a tuple of pairs
    ('lr_mults', (('head', '2'),), 'config.optim.lr_mults'),
    ('frozen', ('encoder/[',), 'config.optim.frozen: bad regex'),
])
def test_validate_names_the_bad_field(field, value, message):
  config = make_config()
  optim.validate(config)
  config.optim[field] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    optim.validate(config)
