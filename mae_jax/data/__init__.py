"""Input pipeline: sources, augmentation, deterministic host-sharded loading."""
from mae_jax.data import loader, sources, transforms


def train_loader(config, process_index=0, process_count=1):
  source = sources.create(config.data, config.data.train_split)
  return loader.TrainLoader(source, transforms.TrainTransform(config.data), config.train.batch_size, config.seed,
                            process_index, process_count)


def eval_source(config):
  """The labelled split used for kNN evaluation, or None when `config.data.eval_split` is empty."""
  return sources.create(config.data, config.data.eval_split) if config.data.eval_split else None
