"""Tasks: what the one training loop runs, chosen by `config.task` (DESIGN decision 11).

A task hands the loop four things and nothing else: its model (the `Objective` seam: params, loss, update
phases, frozen networks), the transform of its training images, a batch-level hook that runs inside the
jitted step (mixup/cutmix for fine-tuning), and its evaluators. The loop never branches on a task's name,
so fine-tuning, linear probing and generation each arrive as one more entry of `TASKS`.
"""
from mae_jax import data, objectives
from mae_jax.config import require
from mae_jax.data import transforms
from mae_jax.evaluate.knn import KnnEvaluator


class Task:
  evaluators = {}  # name -> Evaluator class, built as cls(config, model, train_source, eval_source, mesh)
  start_label = 'step 0'  # how the final summary names the params evaluated before training

  def __init__(self, config):
    self.config = config

  @classmethod
  def validate(cls, config):
    for name in config.eval.evaluators:
      require(name in cls.evaluators, f'config.eval.evaluators: {name!r} is not an evaluator of '
              f'task {config.task!r} (choose from {sorted(cls.evaluators)})')

  def build_model(self):
    raise NotImplementedError

  def train_transform(self):
    """Per-image augmentation on the host (`data.transforms`); a pure function of the example's seed."""
    return transforms.TrainTransform(self.config.data)

  def batch_hook(self, batch, rng):
    """Batch-level augmentation inside the jitted step (after the example keys are drawn); `rng` is its own."""
    del rng
    return batch

  def build_evaluators(self, model, train_source, mesh):
    """The evaluators that `config.eval.evaluators` names, on the labelled split (none without one)."""
    eval_source = data.eval_source(self.config)
    if eval_source is None:
      return {}
    return {name: self.evaluators[name](self.config, model, train_source, eval_source, mesh)
            for name in self.config.eval.evaluators}


class Pretrain(Task):
  """Self-supervised pretraining with `config.objective`, watched by a kNN monitor on frozen features."""
  evaluators = {'knn': KnnEvaluator}
  start_label = 'random init'

  def build_model(self):
    return objectives.create(self.config)


TASKS = {
    'pretrain': Pretrain,
}


def create(config):
  return TASKS[config.task](config)
