"""Held-out reconstruction of a tokenizer: the error of decode(encode(x)) and the codebook entries it uses.

Runs the objective's jitted, batch-sharded `reconstruct(params, images) -> (reconstructions, ids)` over the eval
split (the eval transform, so the tokenizer's [0, 1] pixels) and reduces on the host: mean squared and absolute
pixel error, PSNR of the mean squared error, the fraction of the codebook used and the perplexity of the ids.
"""
import jax
import numpy as np

from mae_jax import sharding
from mae_jax.data import loader, transforms
from mae_jax.evaluate.base import Evaluator


def usage_and_perplexity(counts):
  """(fraction of entries with a nonzero count, exp(entropy of the frequencies))."""
  p = counts[counts > 0] / counts.sum()
  return float(np.mean(counts > 0)), float(np.exp(-np.sum(p * np.log(p))))


class ReconstructionEvaluator(Evaluator):
  """{'recon/mse', 'recon/l1', 'recon/psnr', 'codebook/usage', 'codebook/perplexity'} on the eval split."""

  def __init__(self, config, objective, train_source, eval_source, mesh):
    del train_source
    self.config, self.mesh, self.eval_source = config, mesh, eval_source
    self.transform = transforms.EvalTransform(config.data)
    self.reconstruct = jax.jit(objective.reconstruct, out_shardings=sharding.replicated(mesh))
    self.n_embed = objective.n_embed
    devices = mesh.devices.size
    self.batch_size = max(devices, config.eval.batch_size // devices * devices)

  def __call__(self, params):
    squared = absolute = pixels = 0.0
    counts = np.zeros(self.n_embed, np.int64)
    n_proc, proc = jax.process_count(), jax.process_index()
    for batch in loader.eval_batches(self.eval_source, self.transform, self.batch_size):
      n = len(batch['label'])
      images = np.pad(batch['image'], ((0, self.batch_size - n), (0, 0), (0, 0), (0, 0)))
      local = np.split(images, n_proc)[proc]
      reconstruction, ids = self.reconstruct(params, sharding.global_batch({'image': local}, self.mesh)['image'])
      diff = np.asarray(reconstruction, np.float64)[:n] - batch['image']
      squared, absolute, pixels = squared + np.sum(diff**2), absolute + np.sum(np.abs(diff)), pixels + diff.size
      counts += np.bincount(np.asarray(ids)[:n].reshape(-1), minlength=self.n_embed)
    mse = squared / pixels
    usage, perplexity = usage_and_perplexity(counts)
    return {'recon/mse': mse, 'recon/l1': absolute / pixels, 'recon/psnr': float(10 * np.log10(1.0 / mse)),
            'codebook/usage': usage, 'codebook/perplexity': perplexity}
