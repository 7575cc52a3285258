"""Orbax checkpoints of the whole train state, plus the config that produced them.

A checkpoint holds everything needed to continue exactly: params, optimizer state, step and the base
RNG key; the data pipeline's position is the step itself (see `data/loader.py`). Restoring takes the
target shardings, so a run saved on one mesh resumes on another.
"""
import os

import ml_collections
import orbax.checkpoint as ocp


def directory(workdir):
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:

  def __init__(self, workdir, every_steps, keep):
    options = ocp.CheckpointManagerOptions(save_interval_steps=every_steps, max_to_keep=keep,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(directory(workdir), options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step, state, config, force=False):
    """Saves asynchronously if `step` is on the interval (or `force`); returns whether it saved."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
    return self.manager.save(step, args=args, force=force)

  def restore(self, abstract_state, step=None):
    """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs with `.sharding`)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_params(workdir, step=None):
  """(config, params) of a run's checkpoint (latest by default), on the default device, for export."""
  manager = ocp.CheckpointManager(directory(workdir), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {directory(workdir)}')
  config = ml_collections.ConfigDict(manager.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore())).config)
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return config, state['params']
