"""The one interface of every evaluator (kNN today; top-1/top-5 classification and FID/IS next).

An evaluator is built once by its task from the config, runs sharded on every host (each host feeds its
slice of each batch; the results are replicated), and returns named scalars that the loop writes to
TensorBoard and metrics.jsonl and prints. `config.eval.evaluators` chooses which of the task's run.
"""
import abc


class Evaluator(abc.ABC):
  every_steps = 0  # also every this many steps during training; 0: only before training and at the end

  @abc.abstractmethod
  def __call__(self, params):
    """{metric name: float} for `params` (the trainable params and the frozen networks, merged)."""
