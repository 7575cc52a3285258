"""Frozen networks: tokenizers and teachers that an objective uses but never trains (DESIGN decision 10).

An objective declares them (`Objective.frozen_networks`); each is named by a config field holding a file
(the params written by `python -m mae_jax.export import`, a flax msgpack) or a run's workdir (its latest
checkpoint, optionally one subtree of its params). The loop loads each once, checks it against the
network's expected shapes before anything compiles, places it on the mesh (sharded over 'fsdp' by the same
rule as the train state when large, replicated otherwise) and passes it to the jitted step as an argument of
its own. It reaches the objective's `loss_fn` as `params[name]`, behind a stop-gradient: never
differentiated, never in the optimizer state, never in the run's checkpoints, not counted in the gradient
norm or the non-finite check (big_vision's distillation trainer: "we never change the teachers, so only
checkpoint student here").
"""
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np

from mae_jax import paths, sharding
from mae_jax.config import ConfigError


class FrozenNetwork(NamedTuple):
  """A network loaded from the file or workdir that config field `field` (dotted, e.g. 'mr_mae.teacher') names.

  `abstract_params`: a function returning the params the network expects (shapes and dtypes, e.g.
  `lambda: jax.eval_shape(module.init, key, dummy)['params']`); `subtree`: the top-level params entry to take
  from the checkpoint or the file (e.g. 'encoder'; `export import` writes a model's whole params); '' takes all.
  `adapt`: optional, host params -> the network's, before the check (a teacher's position table resampled
  to the student's grid).
  """
  field: str
  abstract_params: Callable
  subtree: str = ''
  adapt: Optional[Callable] = None


def config_value(config, field):
  value = config
  for key in field.split('.'):
    value = value[key]
  return value


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read(network, config):
  """The network's params as host arrays, checked against its expected shapes; ConfigError naming the field."""
  path = config_value(config, network.field)
  where = f'config.{network.field}={path!r}'
  if not path:
    raise ConfigError(f'config.{network.field} is empty: name the file (python -m mae_jax.export import) or the '
                      'workdir this frozen network is loaded from')
  from mae_jax import checkpoint  # late: checkpoint imports orbax, which this module's users may not need
  if paths.is_remote(path):
    paths.check_remote(path, where)
  if paths.isdir(checkpoint.directory(path)):
    _, params = checkpoint.load_params(path)
  elif paths.isfile(path):
    from mae_jax.export import load_init_params
    try:
      params = load_init_params(path)
    except Exception as e:  # a torch file, a truncated or foreign file
      raise ConfigError(f'{where} is not a params file written by `python -m mae_jax.export import`: {e}') from None
  else:
    raise ConfigError(f'{where}: no such file, and no run (checkpoints/) in such a directory')
  if network.subtree:
    if network.subtree not in params:
      raise ConfigError(f'{where}: the params have no [{network.subtree!r}] entry (they have {sorted(params)})')
    params = params[network.subtree]
  if network.adapt:
    params = network.adapt(params)
  expected, found = _flat(network.abstract_params()), _flat(params)
  problems = [f'{key}: missing' for key in expected if key not in found]
  problems += [f'{key}: not expected' for key in found if key not in expected]
  problems += [f'{key}: shape {tuple(np.shape(found[key]))}, expected {tuple(spec.shape)}' for key, spec in
               expected.items() if key in found and tuple(np.shape(found[key])) != tuple(spec.shape)]
  if problems:
    shown = '; '.join(problems[:6]) + (f'; ... {len(problems) - 6} more' if len(problems) > 6 else '')
    raise ConfigError(f'{where} does not fit the network this objective expects: {shown}')
  return jax.tree.map(lambda spec, value: np.asarray(value, spec.dtype), network.abstract_params(), params)


def load(networks, config, mesh):
  """{name: params on the mesh} for `networks` ({name: FrozenNetwork}), and their shardings."""
  host = {name: read(network, config) for name, network in networks.items()}
  shardings = sharding.state_shardings(host, mesh, config.mesh.fsdp_min_size_mb)
  return jax.device_put(host, shardings), shardings
