"""Weighted k-nearest-neighbour classification of frozen features (as in DINO's kNN evaluation).

Cosine similarity between L2-normalised features; each of the k nearest training features votes for its
label with weight exp(similarity / temperature).
"""
import jax
import numpy as np

from mae_jax import sharding
from mae_jax.data import loader, transforms
from mae_jax.evaluate.base import Evaluator


def knn_top1(train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07):
  train = train_features / np.linalg.norm(train_features, axis=1, keepdims=True)
  test = test_features / np.linalg.norm(test_features, axis=1, keepdims=True)
  similarity = test @ train.T
  k = min(k, train.shape[0])
  nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
  votes = np.zeros((test.shape[0], num_classes))
  np.add.at(votes, (np.arange(test.shape[0])[:, None], train_labels[nearest]), weights)
  return float(np.mean(votes.argmax(axis=1) == test_labels))


class EvenSubset:
  """`size` evenly spaced examples of `source` (the whole source if it is smaller): a bounded kNN bank."""

  def __init__(self, source, size):
    self.source, self.num_classes = source, source.num_classes
    self.indices = np.linspace(0, len(source) - 1, min(size, len(source))).round().astype(int)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index):
    return self.source[int(self.indices[index])]

  def describe(self, index):
    return self.source.describe(int(self.indices[index]))


class KnnEvaluator(Evaluator):
  """Extracts features of the train split (the bank) and the eval split (the queries) with a jitted,
  batch-sharded feature function, then classifies the queries: {'knn/top1': accuracy}."""

  def __init__(self, config, objective, train_source, eval_source, mesh):
    self.config, self.mesh = config, mesh
    self.every_steps = config.eval.knn_every_steps
    bank = config.eval.knn_bank_size
    self.train_source = EvenSubset(train_source, bank) if bank and bank < len(train_source) else train_source
    self.eval_source = eval_source
    self.transform = transforms.EvalTransform(config.data)
    self.features = jax.jit(objective.features, out_shardings=sharding.replicated(mesh))
    devices = mesh.devices.size
    self.batch_size = max(devices, config.eval.knn_batch_size // devices * devices)

  def _extract(self, params, source):
    feats, labels = [], []
    n_proc, proc = jax.process_count(), jax.process_index()
    for batch in loader.eval_batches(source, self.transform, self.batch_size):
      n = len(batch['label'])
      images = np.pad(batch['image'], ((0, self.batch_size - n), (0, 0), (0, 0), (0, 0)))
      local = np.split(images, n_proc)[proc]
      out = self.features(params, sharding.global_batch({'image': local}, self.mesh)['image'])
      feats.append(np.asarray(out)[:n])
      labels.append(batch['label'])
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)

  def __call__(self, params):
    train_x, train_y = self._extract(params, self.train_source)
    test_x, test_y = self._extract(params, self.eval_source)
    return {'knn/top1': knn_top1(train_x, train_y, test_x, test_y, self.eval_source.num_classes,
                                 self.config.eval.knn_k, self.config.eval.knn_temperature)}
