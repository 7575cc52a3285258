"""The one training loop, for every objective and every scale.

mesh -> data -> objective -> optimizer -> abstract state -> shardings -> restore or init -> jitted step
-> loop (log, images, kNN, checkpoints) -> final save. The loop never looks at the objective's name.
"""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import checkpoint, data, metrics, objectives, optim, sharding
from mae_jax import config as config_lib
from mae_jax.evaluate.knn import KnnEvaluator


def check_workdir(workdir):
  parent = os.path.dirname(os.path.abspath(workdir))
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f'--workdir={workdir}: the parent directory {parent} does not exist')
  os.makedirs(workdir, exist_ok=True)
  if not os.access(workdir, os.W_OK):
    raise config_lib.ConfigError(f'--workdir={workdir} is not writable')


def check_batch(config, mesh):
  devices, accum = mesh.devices.size, config.train.grad_accum_steps
  if config.train.batch_size % (devices * accum):
    raise config_lib.ConfigError(
        f'config.train.batch_size={config.train.batch_size} is not divisible by the {devices} devices of the mesh '
        f'{dict(mesh.shape)}' + (f' times config.train.grad_accum_steps={accum}' if accum > 1 else ''))


def total_steps(config, steps_per_epoch):
  return config.train.num_steps if config.train.num_steps > 0 else config.train.epochs * steps_per_epoch


def make_init_fn(objective, tx, seed):
  def init_state(rng):
    params = objective.init(rng)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
            'rng': jax.random.key_data(jax.random.key(seed))}
  return init_state


def with_example_keys(batch, rng):
  """Adds one PRNG key per example, so random draws (masks) do not depend on how the batch is split
  over devices or micro-batches."""
  keys = jax.random.key_data(jax.random.split(rng, batch['image'].shape[0]))
  return {**batch, 'example_key': keys}


def make_train_step(objective, tx, schedule, grad_accum_steps=1):
  grad_fn = jax.value_and_grad(lambda params, batch, rng: objective.loss_fn(params, batch, rng, True), has_aux=True)

  def gradients(params, batch, rng):
    """Loss, metrics and gradients of the batch, accumulated over `grad_accum_steps` micro-batches."""
    if grad_accum_steps == 1:
      return grad_fn(params, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(total, index_and_batch):
      index, micro_batch = index_and_batch
      out = grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(lambda t, o: t + o / grad_accum_steps, total, out), None

    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum_steps), micro))
    return total

  def train_step(state, batch):
    # A fresh key per step, folded inside jit: the same on every mesh, and restored with the step.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    example_rng, rng = jax.random.split(rng)
    (loss, step_metrics), grads = gradients(state['params'], with_example_keys(batch, example_rng), rng)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    step_metrics = {**step_metrics, 'loss': loss, 'lr': schedule(state['step']), 'grad_norm': optax.global_norm(grads)}
    return {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, step_metrics
  return train_step


class Trainer:
  """Everything built from the config, before any step runs (also used by the benchmark and tests)."""

  def __init__(self, config, workdir=None, devices=None):
    config_lib.validate(config)
    if workdir is not None:
      check_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config.mesh, devices)
    check_batch(config, self.mesh)
    self.objective = objectives.create(config)
    self.loader = data.train_loader(config, jax.process_index(), jax.process_count())
    self.total_steps = total_steps(config, self.loader.steps_per_epoch)
    self.schedule = optim.learning_rate_schedule(config.train, self.loader.steps_per_epoch, self.total_steps)
    abstract_params = jax.eval_shape(self.objective.init, jax.random.key(0))
    self.tx = optim.create(config.train, self.schedule, self.objective.trainable(abstract_params))
    self.init_fn = make_init_fn(self.objective, self.tx, config.seed)
    abstract_state = jax.eval_shape(self.init_fn, jax.random.key(0))
    self.state_sharding = sharding.state_shardings(abstract_state, self.mesh, config.mesh.fsdp_min_size_mb)
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_sharding)
    self.train_step = jax.jit(make_train_step(self.objective, self.tx, self.schedule, config.train.grad_accum_steps),
                              in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh)),
                              out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                              donate_argnums=(0,))

  def init_state(self):
    """The initial state, created directly in its sharded layout (never whole on one device)."""
    init = jax.jit(self.init_fn, out_shardings=self.state_sharding)
    return init(jax.random.key(self.config.seed))


def train_and_evaluate(config, workdir):
  """Pretrains per `config` in `workdir`, resuming from the latest checkpoint there if any."""
  trainer = Trainer(config, workdir)
  cfg, mesh, objective = config, trainer.mesh, trainer.objective
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.every_steps, cfg.checkpoint.keep)
  start = ckpt.latest_step()
  is_chief = jax.process_index() == 0
  if start is None:
    state, start = trainer.init_state(), 0
  else:
    state = ckpt.restore(trainer.abstract_state, start)
    if is_chief:
      print(f'Resuming from the checkpoint at step {start} in {checkpoint.directory(workdir)}', flush=True)
  writer = metrics.Writer(workdir, trainer.total_steps, start, enabled=is_chief)
  eval_source = data.eval_source(cfg)
  knn = KnnEvaluator(cfg, objective, trainer.loader.source, eval_source, mesh) if eval_source else None

  def evaluate(step):
    accuracy = knn(state['params'])
    writer.scalars(step, {'knn/top1': accuracy})
    if is_chief:
      print(f'step {step}: kNN top-1 {accuracy:.4f}', flush=True)
    return accuracy

  if knn and start == 0:
    evaluate(0)
  visualize = jax.jit(objective.visualize, out_shardings=sharding.replicated(mesh))
  preview = sharding.global_batch(next(trainer.loader.iterate(0, 1, prefetch=0)), mesh)['image'][:cfg.log.num_images]
  if is_chief:
    print(f'Training {cfg.objective} {cfg.model.variant} on {mesh.devices.size} device(s), mesh {dict(mesh.shape)}, '
          f'steps {start}->{trainer.total_steps}, batch {cfg.train.batch_size}', flush=True)

  step, t0 = start, time.time()
  for local_batch in trainer.loader.iterate(start, trainer.total_steps, cfg.data.prefetch):
    state, step_metrics = trainer.train_step(state, sharding.global_batch(local_batch, mesh))
    step += 1
    if step % cfg.log.every_steps == 0 or step == trainer.total_steps:
      values = jax.device_get(step_metrics)
      writer.scalars(step, values)
      rate = writer.progress(step, cfg.train.batch_size, {'loss': values['loss'], 'lr': values['lr']})
      writer.scalars(step, {'perf/images_per_sec': rate})
    if step % cfg.log.images_every_steps == 0 or step == trainer.total_steps:
      shown = visualize(state['params'], preview, jax.random.key(step))
      if shown is not None:
        writer.images(step, 'reconstruction', metrics.image_grid(jax.device_get(shown), cfg.data.mean, cfg.data.std))
    ckpt.save(step, state, cfg)
    if knn and cfg.eval.knn_every_steps and step % cfg.eval.knn_every_steps == 0 and step != trainer.total_steps:
      evaluate(step)

  if ckpt.latest_step() != step:
    ckpt.save(step, state, cfg, force=True)
  ckpt.close()
  final = evaluate(step) if knn else None
  writer.close()
  if is_chief:
    print(f'Done: {step - start} steps in {time.time() - t0:.0f}s; checkpoint at step {step} in '
          f'{checkpoint.directory(workdir)}', flush=True)
    baseline = [r['knn/top1'] for r in metrics.read_jsonl(workdir) if r['step'] == 0 and 'knn/top1' in r]
    if final is not None and baseline:
      print(f'kNN top-1 on {cfg.data.name}/{cfg.data.eval_split}: random init {baseline[0]:.4f} -> '
            f'trained {final:.4f}', flush=True)
  return state
