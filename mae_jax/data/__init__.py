"""Input pipeline: sources (embedded, image folder, TFDS), augmentation, deterministic host-sharded loading.

See docs/data.md for preparing ImageNet and for the guarantees (determinism, resumption, bad files).
"""
from mae_jax.data import decode, loader, sources, transforms
from mae_jax.data.sources import DataError


def train_loader(config, process_index=0, process_count=1, transform=None):
  """The training batches; `transform`: the task's per-image augmentation (default: the pretraining one)."""
  source = sources.create(config.data, config.data.train_split)
  return loader.TrainLoader(source, transform or transforms.TrainTransform(config.data), config.train.batch_size,
                            config.seed, process_index, process_count, config.data.num_workers)


def eval_source(config):
  """The labelled split used for kNN evaluation, or None when `config.data.eval_split` is empty."""
  if not config.data.eval_split:
    return None
  return sources.create(config.data, config.data.eval_split, class_split=config.data.train_split)
