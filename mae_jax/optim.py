"""Optimizers and their parameter groups, as configuration (DESIGN.md decision 12); lr schedule of the reference.

`config.optim` names the optimizer ('adamw', 'lars', 'sgd') and rules over parameter paths, the '/'-joined
keys of the params tree ('encoder/blocks_3/attn/qkv/kernel'), matched with `re.fullmatch`:
  wd_mults / lr_mults: ((regex, multiplier), ...): the first matching rule scales config.train.weight_decay
                       (or the learning rate) for that leaf; no match means 1.
  frozen:              (regex, ...): no update and no optimizer state, like the objective's False leaves.
  layer_decay:         the reference's layer-wise lr decay (util/lr_decay.py), multiplied with lr_mults.
  decay_1d:            whether leaves with ndim <= 1 (biases, LayerNorm) decay at all. MAE: never; its cls
                       and mask tokens (1, 1, D) and all kernels do (timm's `add_weight_decay`).
Each leaf's update is then that of a torch param group {'lr': lr * lr_scale, 'weight_decay': wd * wd_scale}.
With the defaults (AdamW, no rules) the optimizer and its state are exactly those of the earlier code, so old
checkpoints restore.
"""
import re
from numbers import Real

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

NAMES = ('adamw', 'lars', 'sgd')


class PhaseTrainable(dict):
  """`trainable`'s answer for an objective with several update phases: {phase name: pytree of bools like
  params}, the leaves each phase's optimizer updates. A leaf may belong to several phases (GAN-MAE's
  shared encoder); a leaf in none is frozen. `optim.create` builds one optimizer (own moments, own
  count) per entry."""


def default_config():
  return ml_collections.ConfigDict(dict(
      name='adamw',             # 'adamw' | 'lars' | 'sgd' (b1, b2, weight_decay, grad_clip: config.train)
      eps=1e-8,                 # adamw
      momentum=0.9,             # sgd, lars
      trust_coefficient=0.001,  # lars
      decay_1d=False,           # weight decay for leaves with ndim <= 1 too (MAE: no)
      wd_mults=(),              # ((regex, multiplier), ...); MAE fine-tuning: (('encoder/(pos_embed|cls_token)', 0.),)
      lr_mults=(),              # ((regex, multiplier), ...)
      frozen=(),                # (regex, ...): not updated, no optimizer state
      layer_decay=1.0,          # layer-wise lr decay (1.0 = off); MAE fine-tuning: 0.65 (B), 0.75 (L, H)
  ))


def validate(config):
  """Checks config.optim; raises ConfigError naming the field."""
  from mae_jax.config import ConfigError  # late: config.py imports this module

  def require(ok, message):
    if not ok:
      raise ConfigError(f'config.optim.{message}')

  def require_regex(field, pattern):
    require(isinstance(pattern, str), f'{field}: {pattern!r} is not a regex string')
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f'config.optim.{field}: bad regex {pattern!r}: {e}') from None

  o = config.optim
  require(o.name in NAMES, f'name={o.name!r} is not one of {NAMES}')
  require(o.eps > 0, f'eps={o.eps} must be > 0')
  require(0 <= o.momentum < 1, f'momentum={o.momentum} must be in [0, 1)')
  require(o.trust_coefficient > 0, f'trust_coefficient={o.trust_coefficient} must be > 0')
  require(0 < o.layer_decay <= 1, f'layer_decay={o.layer_decay} must be in (0, 1] (1 = off)')
  require(isinstance(o.decay_1d, bool), f'decay_1d={o.decay_1d!r} must be a bool')
  for field in ('wd_mults', 'lr_mults'):
    require(isinstance(o[field], (tuple, list)), f'{field}={o[field]!r} must be a tuple of (regex, multiplier)')
    for rule in o[field]:
      pair = isinstance(rule, (tuple, list)) and len(rule) == 2
      require(pair and isinstance(rule[1], Real) and not isinstance(rule[1], bool),
              f'{field}: {rule!r} is not a (regex, multiplier) pair')
      require_regex(field, rule[0])
      require(rule[1] >= 0, f'{field}: multiplier {rule[1]} of {rule[0]!r} must be >= 0')
  require(isinstance(o.frozen, (tuple, list)), f'frozen={o.frozen!r} must be a tuple of regexes')
  for pattern in o.frozen:
    require_regex('frozen', pattern)


# --- Parameter groups -------------------------------------------------------------------------------------

def _map(fn, tree, *rest):
  """tree_map with fn(path string, leaf, *rest leaves)."""
  return jax.tree_util.tree_map_with_path(
      lambda keys, *leaves: fn(jax.tree_util.keystr(keys, simple=True, separator='/'), *leaves), tree, *rest)


def _paths(tree):
  return [jax.tree_util.keystr(keys, simple=True, separator='/')
          for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _first_match(rules, path, default):
  return next((value for pattern, value in rules if re.fullmatch(pattern, path)), default)


# ConvMAE's util/lr_decay.py puts its conv stages ('patch_embed1-4', 'blocks1_*', 'blocks2_*') in layer 0 with
# the stem and counts only the transformer stage 'blocks3_{i}'.
_STEM = re.compile(r'encoder/(cls_token|pos_embed|patch_embed\d?|token_embed|blocks[12]_\d+)(/.*)?')
_BLOCK = re.compile(r'encoder/blocks3?_(\d+)/.*')


def _num_layers(tree):
  """The reference's num_layers = depth + 1, depth counted from the tree's 'encoder/blocks_{i}' (a ConvViT's
  'encoder/blocks3_{i}')."""
  return len({m.group(1) for m in map(_BLOCK.fullmatch, _paths(tree)) if m}) + 1


def _layer_id(path, num_layers):
  """util/lr_decay.py `get_layer_id_for_vit`: the stem is layer 0, block i is layer i + 1, the rest (final
  norm, head, decoder) the last layer."""
  if _STEM.fullmatch(path):
    return 0
  block = _BLOCK.fullmatch(path)
  return int(block.group(1)) + 1 if block else num_layers


def _lr_scale(o, path, num_layers):
  scale = float(_first_match(o.lr_mults, path, 1.0))
  if o.layer_decay != 1.0:
    scale *= o.layer_decay ** (num_layers - _layer_id(path, num_layers))
  return scale


def _wd_scale(o, path, ndim):
  if ndim <= 1 and not o.decay_1d:
    return 0.0
  return float(_first_match(o.wd_mults, path, 1.0))


def param_multipliers(config, params):
  """(lr_scale tree, wd_scale tree) of Python floats like `params` (arrays or shapes): each leaf's group."""
  o, num_layers = config.optim, _num_layers(params)
  return (_map(lambda path, p: _lr_scale(o, path, num_layers), params),
          _map(lambda path, p: _wd_scale(o, path, len(p.shape)), params))


def trainable_leaves(config, trainable):
  """The objective's `trainable` (bool tree or PhaseTrainable) with config.optim.frozen's matches False."""
  if isinstance(trainable, PhaseTrainable):
    return PhaseTrainable({name: trainable_leaves(config, tree) for name, tree in trainable.items()})
  frozen = config.optim.frozen
  return _map(lambda path, t: bool(t) and not any(re.fullmatch(r, path) for r in frozen), trainable)


# --- Per-leaf transformations -----------------------------------------------------------------------------
# Inside optax.multi_transform the frozen leaves are optax.MaskedNode, empty pytrees: `_map` skips them and
# sees the same paths as in the full tree.

def _stateless(update):
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _add_decayed_weights(weight_decay, wd_fn):
  """updates + weight_decay * wd_fn(path, ndim) * params."""
  def update(updates, state, params):
    def decay(path, u, p):
      scale = weight_decay * wd_fn(path, p.ndim)
      return u + scale * p if scale else u
    return _map(decay, updates, params), state
  return _stateless(update)


def _weight_decay(weight_decay, o, wd_fn):
  """Decoupled decay of each leaf. With 0/1 multipliers only, optax's masked form: the layout of the earlier
  code's `optax.adamw(..., mask=...)`, which old checkpoints hold."""
  if all(m in (0, 1) for _, m in o.wd_mults):
    return optax.add_decayed_weights(weight_decay, mask=lambda tree: _map(lambda path, p: wd_fn(path, p.ndim) > 0,
                                                                         tree))
  return _add_decayed_weights(weight_decay, wd_fn)


def _scale_by_trust_ratio(trust_coefficient):
  """MAE's util/lars.py: leaves with ndim > 1 scaled by trust * ||p|| / ||dp|| (1 if either norm is 0)."""
  def update(updates, state, params):
    def scale(u, p):
      if p.ndim <= 1:
        return u
      p_norm, u_norm = jnp.sqrt(jnp.sum(jnp.square(p))), jnp.sqrt(jnp.sum(jnp.square(u)))
      safe = (p_norm > 0) & (u_norm > 0)
      return u * jnp.where(safe, trust_coefficient * p_norm / jnp.where(safe, u_norm, 1.0), 1.0)
    return jax.tree.map(scale, updates, params), state
  return _stateless(update)


def _scale_by_lr_multipliers(lr_fn):
  def update(updates, state, params=None):
    del params
    return _map(lambda path, u: u * lr_fn(path), updates), state
  return _stateless(update)


# --- The optimizer ----------------------------------------------------------------------------------------

def create(config, schedule, trainable):
  """config.optim's optimizer over the trainable leaves (`trainable`: pytree of bools like params, or a
  PhaseTrainable); frozen leaves (False there, or matching config.optim.frozen) get no update and no state.

  config.train gives b1, b2, weight_decay and grad_clip (> 0: global-norm clip of the trainable gradients,
  before the optimizer); `schedule(step)` the learning rate. With a `PhaseTrainable` (an objective with
  several update phases, see `Objective.update_phases`): one such optimizer per phase, each with its own
  state and count, run by `tx.update(..., phase=name)`.
  """
  if isinstance(trainable, PhaseTrainable):
    _warn_unmatched(config.optim, next(iter(trainable.values()), {}))
    return per_phase({name: _create(config, schedule, tree) for name, tree in trainable.items()})
  _warn_unmatched(config.optim, trainable)
  return _create(config, schedule, trainable)


def _create(config, schedule, trainable):
  t, o = config.train, config.optim
  num_layers = _num_layers(trainable)  # the same paths as params
  lr_fn = lambda path: _lr_scale(o, path, num_layers)
  wd_fn = lambda path, ndim: _wd_scale(o, path, ndim)
  trainable = trainable_leaves(config, trainable)
  decay = _weight_decay(t.weight_decay, o, wd_fn)
  if o.name == 'adamw':  # optax.adamw(schedule, b1, b2, eps, weight_decay, mask), the same chain
    tx = optax.chain(optax.scale_by_adam(t.b1, t.b2, o.eps), decay, optax.scale_by_learning_rate(schedule))
  elif o.name == 'sgd':  # torch.optim.SGD: decay into the gradient, momentum buffer (torch's first buf = g), lr
    tx = optax.chain(decay, optax.trace(decay=o.momentum), optax.scale_by_learning_rate(schedule))
  elif o.name == 'lars':  # MAE's LARS: decay, trust ratio, momentum, then the lr (optax.lars scales by lr first)
    tx = optax.chain(decay, _scale_by_trust_ratio(o.trust_coefficient), optax.trace(decay=o.momentum),
                     optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f'unknown optimizer {o.name!r}')
  paths = [path for path, on in zip(_paths(trainable), jax.tree.leaves(trainable)) if on]
  if any(lr_fn(path) != 1.0 for path in paths):  # the default adds nothing: old checkpoints' state layout
    tx = optax.chain(tx, _scale_by_lr_multipliers(lr_fn))
  if t.get('grad_clip', 0.0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  labels = jax.tree.map(lambda on: 'train' if on else 'frozen', trainable)
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, labels)


def _warn_unmatched(o, tree):
  """A rule that matches no parameter is most likely a typo: say so (it is not an error, since one config
  may serve models with and without, say, a learned pos_embed)."""
  paths = _paths(tree)
  rules = [('wd_mults', r) for r, _ in o.wd_mults] + [('lr_mults', r) for r, _ in o.lr_mults]
  for field, pattern in rules + [('frozen', r) for r in o.frozen]:
    if not any(re.fullmatch(pattern, path) for path in paths):
      logging.warning('config.optim.%s: %r matches no parameter', field, pattern)


def per_phase(optimizers):
  """Combines {phase name: optimizer}: the state is {phase name: state}; `update(..., phase=name)` runs that
  phase's optimizer and leaves the other phases' states as they are."""

  def init(params):
    return {name: tx.init(params) for name, tx in optimizers.items()}

  def update(updates, state, params=None, *, phase, **extra_args):
    del extra_args
    if phase not in optimizers:
      raise KeyError(f'no optimizer for update phase {phase!r}; the objective declared {sorted(optimizers)}')
    updates, phase_state = optimizers[phase].update(updates, state[phase], params)
    return updates, {**state, phase: phase_state}

  return optax.GradientTransformationExtraArgs(init, update)


# --- Learning rate ----------------------------------------------------------------------------------------

def peak_learning_rate(train_config):
  return train_config.blr * train_config.batch_size / 256


def learning_rate_schedule(train_config, steps_per_epoch, total_steps):
  """lr(step), evaluated per step on fractional epochs like `util/lr_sched.adjust_learning_rate`."""
  peak, floor = peak_learning_rate(train_config), train_config.min_lr
  warmup = min(train_config.warmup_epochs * steps_per_epoch, 0.5 * total_steps)  # short smoke runs still decay

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup, 1e-9)
    progress = (step - warmup) / max(total_steps - warmup, 1e-9)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule
