"""The one interface of every evaluator (kNN, top-1/top-5 classification, FID/IS).

An evaluator is built once by its task from the config, runs sharded on every host (each host feeds its
slice of each batch; the results are replicated), and returns named scalars that the loop writes to
TensorBoard and metrics.jsonl and prints. `config.eval.evaluators` chooses which of the task's run.
"""
import abc


class Evaluator(abc.ABC):
  every_steps = 0  # also every this many steps during training; 0: only before training and at the end
  needs_eval_split = True  # built only when config.data.eval_split names one (FID scores samples: it does not)

  @staticmethod
  def validate(config, task):
    """ConfigError for what can be checked before the evaluator is built (`config.eval.evaluators` names it in
    task `task`); nothing by default."""

  @abc.abstractmethod
  def __call__(self, params):
    """{metric name: float} for `params` (the trainable params and the frozen networks, merged)."""
