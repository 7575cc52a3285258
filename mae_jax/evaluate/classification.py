"""Top-1 / top-5 accuracy and loss of a classifier on the labelled eval split, sharded over the mesh."""
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import sharding
from mae_jax.data import loader, transforms
from mae_jax.evaluate.base import Evaluator


def top_k_correct(logits, labels, k):
  """Per example, whether the label is among the k largest logits (timm's `accuracy`)."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return (top == labels[:, None]).any(-1)


class ClassificationEvaluator(Evaluator):
  """{'eval/top1', 'eval/top5', 'eval/loss'} of `model.predict` over every image of the eval split, with the
  evaluation transform (resize to int(size / 0.875), centre crop). Runs every `config.eval.every_steps`."""

  def __init__(self, config, model, train_source, eval_source, mesh):
    del train_source
    self.mesh, self.source, self.every_steps = mesh, eval_source, config.eval.every_steps
    self.transform = transforms.EvalTransform(config.data)
    devices = mesh.devices.size
    self.batch_size = max(devices, config.eval.batch_size // devices * devices)

    def scores(params, images, labels, valid):
      logits = model.predict(params, images)
      logprobs = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logprobs, labels[:, None], axis=-1)[:, 0]
      return {'top1': (top_k_correct(logits, labels, 1) * valid).sum(),
              'top5': (top_k_correct(logits, labels, 5) * valid).sum(), 'loss': (nll * valid).sum()}
    self.scores = jax.jit(scores, out_shardings=sharding.replicated(mesh))

  def __call__(self, params):
    totals, count = {'top1': 0.0, 'top5': 0.0, 'loss': 0.0}, 0
    n_proc, proc = jax.process_count(), jax.process_index()
    for batch in loader.eval_batches(self.source, self.transform, self.batch_size):
      n = len(batch['label'])
      pad = ((0, self.batch_size - n),)
      local = {'image': np.pad(batch['image'], pad + ((0, 0),) * 3),
               'label': np.pad(batch['label'].astype(np.int32), pad),
               'valid': np.pad(np.ones(n, np.float32), pad)}
      local = jax.tree.map(lambda x: np.split(x, n_proc)[proc], local)
      batch = sharding.global_batch(local, self.mesh)
      out = jax.device_get(self.scores(params, batch['image'], batch['label'], batch['valid']))
      totals = {k: totals[k] + float(out[k]) for k in totals}
      count += n
    return {f'eval/{k}': v / count for k, v in totals.items()}
