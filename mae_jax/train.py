"""The one training loop, for every task, objective and scale.

mesh -> task -> model (objective) -> frozen networks -> data -> optimizer -> abstract state -> shardings
-> restore or init -> jitted step -> loop (log, images, evaluators, checkpoints) -> final save. The loop
never looks at the task's or the objective's name.
"""
import os
import time

import jax
import jax.numpy as jnp
import optax
from etils import epath

from mae_jax import checkpoint, data, distributed, frozen, metrics, optim, paths, preemption, sharding, tasks
from mae_jax import workdir as workdir_lib
from mae_jax import config as config_lib


check_workdir = workdir_lib.check


def check_batch(config, mesh):
  devices, accum = mesh.devices.size, config.train.grad_accum_steps
  if config.train.batch_size % (devices * accum):
    raise config_lib.ConfigError(
        f'config.train.batch_size={config.train.batch_size} is not divisible by the {devices} devices of the mesh '
        f'{dict(mesh.shape)}' + (f' times config.train.grad_accum_steps={accum}' if accum > 1 else ''))


def total_steps(config, steps_per_epoch):
  return config.train.num_steps if config.train.num_steps > 0 else config.train.epochs * steps_per_epoch


class NonFiniteError(RuntimeError):
  """The loss or the gradients stopped being finite; the last checkpoint is intact."""


def make_init_fn(objective, tx, seed):
  def init_state(rng):
    params = objective.init(rng)
    zero = jnp.zeros((), jnp.int32)
    state = {'step': zero, 'params': params, 'opt_state': tx.init(params),
             'rng': jax.random.key_data(jax.random.key(seed)),
             'nonfinite': {'total': zero, 'consecutive': zero, 'last_step': zero - 1}}
    collections = objective.init_collections(jax.random.fold_in(rng, 1))
    return {**state, 'collections': collections} if collections else state  # only tasks with BatchNorm have them
  return init_state


def check_nonfinite(state, train_config, step):
  """Raises NonFiniteError per `config.train.on_nonfinite` (`step`: the current one); returns the number of
  skipped steps."""
  counts = jax.device_get(state['nonfinite'])
  total, consecutive, last = int(counts['total']), int(counts['consecutive']), int(counts['last_step'])
  if total and (train_config.on_nonfinite == 'stop' or consecutive >= train_config.max_consecutive_nonfinite):
    why = ('config.train.on_nonfinite=stop' if train_config.on_nonfinite == 'stop' else
           f'{consecutive} consecutive non-finite steps (config.train.max_consecutive_nonfinite)')
    raise NonFiniteError(f'non-finite loss or gradients at step {last} ({why}; stopped at step {step}); its '
                         'update was not applied and the last checkpoint is intact. Lower the learning rate, or '
                         'set config.train.on_nonfinite=skip to skip such steps.')
  return total


def with_example_keys(batch, rng):
  """Adds one PRNG key per example, so random draws (masks) do not depend on how the batch is split
  over devices or micro-batches."""
  keys = jax.random.key_data(jax.random.split(rng, batch['image'].shape[0]))
  return {**batch, 'example_key': keys}


def trainable_norm(grads, trainable):
  """Global norm of the gradients of the trainable leaves (`trainable`: pytree of bools like grads)."""
  return optax.tree.norm(jax.tree.map(lambda g, t: g if t else jnp.zeros((), g.dtype), grads, trainable))


def phase_grad_fn(objective, phase, single=True):
  """value_and_grad of one update phase's loss, with respect to the trainable params only:
  (params, frozen params, collections, batch, rng) -> ((loss, (metrics, collections)), grads like params)."""
  def loss_of(params, frozen_params, collections, batch, rng):
    merged = {**params, **jax.lax.stop_gradient(frozen_params)}
    if single:
      loss, metrics, collections = objective.loss_with_collections(merged, collections, batch, rng, True)
    else:
      loss, metrics = phase.loss_fn(merged, batch, rng, True)
    return loss, (metrics, collections)
  return jax.value_and_grad(loss_of, has_aux=True)


def make_train_step(objective, tx, schedule, grad_accum_steps=1, trainable=None, batch_hook=None,
                    skip_nonfinite=False):
  """The step: for each of `objective.update_phases()` in order (one by default), gradients of its loss,
  averaged over `grad_accum_steps` micro-batches, then its optimizer update (`tx.update(..., phase=name)`
  when there are several phases; see `Objective.update_phases`).

  `skip_nonfinite`: when the loss or the gradient norm is not finite, the step keeps the previous params,
  optimizer state and collections, and counts it in `state['nonfinite']`; the host decides whether to stop
  (`check_nonfinite`). With one phase the update runs under a `lax.cond`: a select between the old and the
  new params and moments after it would cost another pass over three times the parameters, as much as the
  update itself on a CPU (docs/performance.md). Several phases update one after the other, so there the old
  values are selected back.

  The step takes (state, batch, frozen): `frozen` are the frozen networks' params ({name: params}), merged
  into the params the loss sees behind a stop-gradient, so their gradients are never formed. `trainable`
  (the optimizer's leaves: a bool tree, or a PhaseTrainable) limits the gradient norm to what is trained.
  `batch_hook(batch, rng)` is the task's batch-level augmentation. Objectives with mutable collections
  (BatchNorm statistics) carry them through the micro-batches in order and store them in the state.
  """
  phases = tuple(objective.update_phases())
  several = len(phases) > 1
  grad_fns = [phase_grad_fn(objective, phase, single=not several) for phase in phases]

  def gradients(grad_fn, params, frozen_params, collections, batch, rng):
    """Loss, metrics, updated collections and gradients, accumulated over `grad_accum_steps` micro-batches."""
    if grad_accum_steps == 1:
      return grad_fn(params, frozen_params, collections, batch, rng)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

    def accumulate(carry, index_and_batch):
      total, collections = carry
      index, micro_batch = index_and_batch
      (loss, (metrics, collections)), grads = grad_fn(params, frozen_params, collections, micro_batch,
                                                      jax.random.fold_in(rng, index))
      total = jax.tree.map(lambda t, o: t + o / grad_accum_steps, total, (loss, metrics, grads))
      return (total, collections), None

    first = jax.tree.map(lambda x: x[0], micro)
    (loss, (metrics, _)), grads = jax.eval_shape(grad_fn, params, frozen_params, collections, first, rng)
    zeros = jax.tree.map(jnp.zeros_like, (loss, metrics, grads))
    ((loss, metrics, grads), collections), _ = jax.lax.scan(accumulate, (zeros, collections),
                                                            (jnp.arange(grad_accum_steps), micro))
    return (loss, (metrics, collections)), grads

  def phase_trainable(name, grads):
    if trainable is None:
      return jax.tree.map(lambda _: True, grads)
    return trainable[name] if isinstance(trainable, optim.PhaseTrainable) else trainable

  def apply_update(phase, grads, params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params, **({'phase': phase.name} if several else {}))
    return optax.apply_updates(params, updates), opt_state

  def train_step(state, batch, frozen_params=None):
    frozen_params = frozen_params or {}
    # A fresh key per step, folded inside jit: the same on every mesh, and restored with the step.
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    example_rng, rng = jax.random.split(rng)
    batch = with_example_keys(batch, example_rng)
    if batch_hook is not None:
      batch = batch_hook(batch, jax.random.fold_in(example_rng, 1))
    params, opt_state, step_metrics, losses, norms = state['params'], state['opt_state'], {}, [], []
    collections = state.get('collections', {})
    for index, (phase, grad_fn) in enumerate(zip(phases, grad_fns)):
      phase_rng = jax.random.fold_in(rng, index) if several else rng
      (loss, (phase_metrics, collections)), grads = gradients(grad_fn, params, frozen_params, collections, batch,
                                                              phase_rng)
      losses.append(loss)
      norms.append(trainable_norm(grads, phase_trainable(phase.name, grads)))
      if skip_nonfinite and not several:
        params, opt_state = jax.lax.cond(jnp.isfinite(loss) & jnp.isfinite(norms[-1]),
                                         lambda p_o: apply_update(phase, grads, *p_o), lambda p_o: p_o,
                                         (params, opt_state))
      else:
        params, opt_state = apply_update(phase, grads, params, opt_state)
      step_metrics.update(phase_metrics)
      if several:
        step_metrics.update({f'loss/phase_{phase.name}': loss, f'grad_norm/{phase.name}': norms[-1]})
    step_metrics.update({
        'loss': losses[0] if not several else sum(losses), 'lr': schedule(state['step']),
        'grad_norm': norms[0] if not several else jnp.sqrt(sum(n**2 for n in norms))})
    new = {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    if 'collections' in state:
      new['collections'] = collections
    if not skip_nonfinite:
      return new, step_metrics
    finite = jnp.isfinite(step_metrics['loss']) & jnp.isfinite(step_metrics['grad_norm'])
    keep_if_bad = lambda updated, previous: jnp.where(finite, updated, previous)
    if several:
      new['params'], new['opt_state'] = jax.tree.map(keep_if_bad, (params, opt_state),
                                                     (state['params'], state['opt_state']))
    if 'collections' in state:
      new['collections'] = jax.tree.map(keep_if_bad, new['collections'], state['collections'])
    counts = state['nonfinite']
    new['nonfinite'] = {'total': counts['total'] + (~finite).astype(jnp.int32),
                        'consecutive': jnp.where(finite, 0, counts['consecutive'] + 1),
                        'last_step': jnp.where(finite, counts['last_step'], new['step'])}
    return new, {**step_metrics, 'nonfinite_steps': new['nonfinite']['total']}
  return train_step


class BoundStep:
  """The jitted step with the frozen networks bound: `step(state, batch)`, and `lower` for AOT compilation."""

  def __init__(self, jitted, frozen_params):
    self.jitted, self.frozen_params = jitted, frozen_params

  def __call__(self, state, batch):
    return self.jitted(state, batch, self.frozen_params)

  def lower(self, state, batch):
    return self.jitted.lower(state, batch, self.frozen_params)


class Trainer:
  """Everything built from the config, before any step runs (also used by the benchmark and tests)."""

  def __init__(self, config, workdir=None, devices=None, loader=None):
    config_lib.validate(config)
    if workdir is not None:
      check_workdir(workdir)
    self.config, self.workdir = config, workdir
    self.mesh = sharding.create_mesh(config.mesh, devices)
    check_batch(config, self.mesh)
    self.task = tasks.create(config)
    self.objective = self.task.build_model()
    # Loaded and checked before anything compiles: a wrong file is one message naming its config field.
    self.frozen, frozen_sharding = frozen.load(self.objective.frozen_networks(), config, self.mesh)
    # `loader`: anything with `steps_per_epoch` and `iterate` (the benchmark's synthetic batches).
    self.loader = loader or data.train_loader(config, jax.process_index(), jax.process_count(),
                                              self.task.train_transform())
    self.total_steps = total_steps(config, self.loader.steps_per_epoch)
    self.schedule = optim.learning_rate_schedule(config.train, self.loader.steps_per_epoch, self.total_steps)
    abstract_params = jax.eval_shape(self.objective.init, jax.random.key(0))
    clash = set(abstract_params) & set(self.frozen)
    if clash:
      raise config_lib.ConfigError(f'frozen networks {sorted(clash)} have the names of trainable params')
    trainable = self.objective.trainable(abstract_params)
    self.tx = optim.create(config, self.schedule, trainable)
    self.init_fn = make_init_fn(self.objective, self.tx, config.seed)
    abstract_state = jax.eval_shape(self.init_fn, jax.random.key(0))
    if 'collections' in abstract_state and len(self.objective.update_phases()) > 1:
      raise config_lib.ConfigError(f'objective {config.objective!r}: mutable collections need a single update phase')
    self.state_sharding = sharding.state_shardings(abstract_state, self.mesh, config.mesh.fsdp_min_size_mb)
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_sharding)
    step_fn = make_train_step(self.objective, self.tx, self.schedule, config.train.grad_accum_steps,
                              optim.trainable_leaves(config, trainable), self.task.batch_hook, skip_nonfinite=True)
    jitted = jax.jit(step_fn,
                     in_shardings=(self.state_sharding, sharding.batch_sharding(self.mesh), frozen_sharding),
                     out_shardings=(self.state_sharding, sharding.replicated(self.mesh)), donate_argnums=(0,))
    self.train_step = BoundStep(jitted, self.frozen)

  def with_frozen(self, state):
    """The params that the objective's functions (features, visualize, predict) take: the state's trainable
    params and the frozen networks, merged, with the mutable collections (if any) under 'collections'."""
    collections = {'collections': state['collections']} if 'collections' in state else {}
    return {**state['params'], **self.frozen, **collections}

  def init_state(self):
    """The initial state, created directly in its sharded layout (never whole on one device)."""
    init = jax.jit(self.init_fn, out_shardings=self.state_sharding)
    return init(jax.random.key(self.config.seed))


def warm_start(state, trainer, source):
  """Replaces the initial params with those of `source` (a run's workdir or an imported params file) that
  match by name and shape."""
  if paths.isdir(checkpoint.directory(source)):
    source_config, params = checkpoint.load_params(source)
  else:
    from mae_jax.export import load_init_params  # an imported PyTorch release (python -m mae_jax.export import)
    source_config, params = None, load_init_params(source)
  params = trainer.objective.warm_start_source(params, source_config)
  merged = checkpoint.merge_matching(jax.device_get(state['params']), params, source)
  return {**state, 'params': jax.device_put(merged, trainer.state_sharding['params'])}


def train_and_evaluate(config, workdir):
  """Runs `config.task` in `workdir`, resuming from the latest checkpoint there if any.

  Killed at any moment and restarted with the same command, a run ends bitwise identical to an
  uninterrupted one: the state, the RNG and the data position all come back from the checkpoint. The
  workdir is locked for the run's duration (process 0 holds the lock); SIGTERM and SIGINT end it with
  `preemption.Interrupted` after saving what was trained.
  """
  config_lib.validate(config)
  # Checked here, not in validate: a resumed run no longer needs its warm start's source.
  config_lib.require(not config.init_from or checkpoint.has_checkpoint(workdir)
                     or epath.Path(config.init_from).exists(),
                     f'config.init_from={config.init_from} does not exist (a workdir, or a file of '
                     'python -m mae_jax.export import)')
  created = not paths.is_remote(workdir) and not os.path.isdir(workdir)
  check_workdir(workdir)
  try:
    with workdir_lib.Lock(workdir, enabled=jax.process_index() == 0) as lock:
      watch = preemption.PreemptionWatch(on_abort=lock.release)
      ckpt = None
      try:
        trainer = Trainer(config, workdir)  # a config or mesh error stops here, before anything is written
        ckpt = checkpoint.Checkpointer(workdir, config.checkpoint)
        return _train_and_evaluate(config, workdir, watch, ckpt, trainer)
      finally:
        watch.close()
        try:
          if ckpt is not None:
            ckpt.close()  # however the run ends: orbax's threads must finish before the interpreter does
        except checkpoint.CheckpointError:
          pass  # a failed save, raised and reported by the run already
  except (config_lib.ConfigError, sharding.MeshError):
    if created and not os.listdir(workdir):
      os.rmdir(workdir)  # a run refused before it started leaves no empty workdir behind
    raise


def _warn_once(warned, kind, step, error):
  """Logging, image grids and evaluations never stop a run: their first failure of each kind is a warning."""
  if kind not in warned:
    warned.add(kind)
    print(f'WARNING: {kind} failed at step {step} ({type(error).__name__}: {str(error)[:300]}); training goes on '
          'without it', flush=True)


def _train_and_evaluate(config, workdir, watch, ckpt, trainer):
  cfg, mesh, objective = config, trainer.mesh, trainer.objective
  is_chief = jax.process_index() == 0
  state, start = ckpt.restore_latest(trainer.abstract_state, cfg)
  if state is None:
    state, start = trainer.init_state(), 0
    if cfg.init_from:
      state = warm_start(state, trainer, cfg.init_from)
  elif is_chief:
    print(f'Resuming from the checkpoint at step {start} in {ckpt.path}', flush=True)
    if ckpt.config_changes:
      print(f'Config changes since that checkpoint: {"; ".join(ckpt.config_changes)}', flush=True)
  if start >= trainer.total_steps:
    distributed.log(f'Already finished at step {start} (this config trains {trainer.total_steps} steps); the '
                    f'checkpoint is in {ckpt.path}. Raise config.train.num_steps or epochs to train further.')
    return state
  writer = metrics.Writer(workdir, trainer.total_steps, start, enabled=is_chief)
  evaluators = trainer.task.build_evaluators(objective, trainer.loader.source, mesh)
  best = checkpoint.BestCheckpointer(workdir, trainer.task.best_metric) if trainer.task.best_metric else None
  warned = set()

  def evaluate(step, due=lambda evaluator: True):
    results = {}
    for name, evaluator in evaluators.items():
      if due(evaluator):
        try:
          results.update(evaluator(trainer.with_frozen(state)))
        except Exception as e:  # pylint: disable=broad-except
          _warn_once(warned, f'the {name} evaluation', step, e)
    if results:
      writer.scalars(step, results)
      if is_chief:
        print(f'step {step}: ' + ', '.join(f'{name} {value:.4f}' for name, value in results.items()), flush=True)
      if best and step > 0:
        best.offer(step, state, cfg, results)
    return results

  def log_images(step):
    shown = visualize(trainer.with_frozen(state), preview, jax.random.key(step))
    if shown is not None:  # jit returns the panels' dict sorted by name: show them in the objective's order
      columns = {name: jax.device_get(shown[name]) for name in objective.image_columns}
      writer.images(step, 'reconstruction', metrics.image_grid(columns, cfg.data.mean, cfg.data.std))

  if start == 0:
    evaluate(0)
  visualize = jax.jit(objective.visualize, out_shardings=sharding.replicated(mesh))
  preview = sharding.global_batch(next(trainer.loader.iterate(0, 1, prefetch=0)), mesh)['image'][:cfg.log.num_images]
  if is_chief:
    print(f'Training {trainer.task.title} {cfg.model.variant} on {mesh.devices.size} device(s), mesh {dict(mesh.shape)}, '
          f'steps {start}->{trainer.total_steps}, batch {cfg.train.batch_size}', flush=True)

  watch.start_training(ckpt.manager)
  step, t0 = start, time.time()
  try:
    for local_batch in trainer.loader.iterate(start, trainer.total_steps, cfg.data.prefetch):
      state, step_metrics = trainer.train_step(state, sharding.global_batch(local_batch, mesh))
      step += 1
      if step % cfg.log.every_steps == 0 or step == trainer.total_steps:
        values = jax.device_get(step_metrics)
        writer.scalars(step, values)
        skipped = {'data/skipped': trainer.loader.skipped} if getattr(trainer.loader, 'skipped', 0) else {}
        rate = writer.progress(step, cfg.train.batch_size, {'loss': values['loss'], 'lr': values['lr'], **skipped})
        writer.scalars(step, {'perf/images_per_sec': rate, **skipped})  # data/skipped: undecodable images replaced
        check_nonfinite(state, cfg.train, step)  # the counters come with the metrics: stop within a log interval
      preempted = watch.reached(step)
      if preempted or ckpt.manager.should_save(step):
        check_nonfinite(state, cfg.train, step)  # never checkpoint past a step that must stop the run
        writer.flush()  # the log up to the step saved: in a bucket it is buffered (metrics.py)
        ckpt.save(step, state, cfg, force=preempted)
      if preempted:
        ckpt.close()
        raise watch.interrupted(f'at step {step}: checkpoint saved in {ckpt.path}; rerun the same command to resume.')
      if step % cfg.log.images_every_steps == 0 or step == trainer.total_steps:  # after the save: it may fail
        try:
          log_images(step)
        except Exception as e:  # pylint: disable=broad-except
          _warn_once(warned, 'the image grid', step, e)
      if step != trainer.total_steps:
        evaluate(step, lambda evaluator: evaluator.every_steps and step % evaluator.every_steps == 0)
    skipped_steps = check_nonfinite(state, cfg.train, step)
    if ckpt.latest_step() != step:
      writer.flush()
      ckpt.save(step, state, cfg, force=True)
  finally:
    ckpt.close()  # waits for in-flight saves: what was saved is complete
  where = f'at step {step}, the last: checkpoint saved in {ckpt.path}'
  if watch.signal:  # a signal during the final save
    raise watch.interrupted(f'{where}; the final evaluation did not run.')
  watch.end_training(f'{where}, but the final evaluation did not finish.')
  final = evaluate(step)
  if best:
    best.close()
  writer.close()
  if is_chief:
    print(f'Done: {step - start} steps in {time.time() - t0:.0f}s; checkpoint at step {step} in {ckpt.path}'
          + (f'; {skipped_steps} non-finite step(s) skipped' if skipped_steps else ''), flush=True)
    first = {name: value for r in metrics.read_jsonl(workdir) if r['step'] == 0 for name, value in r.items()}
    for name, value in final.items():
      if name in first:
        print(f'{name} on {cfg.data.name}/{cfg.data.eval_split}: {trainer.task.start_label} {first[name]:.4f} -> '
              f'trained {value:.4f}', flush=True)
  return state
