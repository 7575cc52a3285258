"""Tasks: what the one training loop runs, chosen by `config.task` (DESIGN decision 11).

A task hands the loop four things and nothing else: its model (the `Objective` seam: params, loss, update
phases, frozen networks), the transform of its training images, a batch-level hook that runs inside the
jitted step (mixup/cutmix for fine-tuning), and its evaluators. The loop never branches on a task's name,
so fine-tuning, linear probing and generation each arrive as one more entry of `TASKS`.
"""
import ml_collections

from mae_jax import data, objectives
from mae_jax.classifier import Classifier
from mae_jax.config import require
from mae_jax.data import mixup, transforms
from mae_jax.evaluate.classification import ClassificationEvaluator
from mae_jax.evaluate.knn import KnnEvaluator
from mae_jax.evaluate.reconstruction import ReconstructionEvaluator
from mae_jax.objectives import mage_generation


class Task:
  evaluators = {}  # name -> Evaluator class, built as cls(config, model, train_source, eval_source, mesh)
  start_label = 'step 0'  # how the final summary names the params evaluated before training
  best_metric = None  # an evaluator's metric: the checkpoint where it is highest is kept beside the latest
  section = None  # the task's own config section (`default_config`), like an objective's

  def __init__(self, config):
    self.config = config

  @property
  def title(self):
    """What the progress line says is trained."""
    return self.config.task

  @staticmethod
  def default_config():
    return None

  @classmethod
  def validate(cls, config):
    for name in config.eval.evaluators:
      require(name in cls.evaluators, f'config.eval.evaluators: {name!r} is not an evaluator of '
              f'task {config.task!r} (choose from {sorted(cls.evaluators)})')
      cls.evaluators[name].validate(config, config.task)

  def build_model(self, num_classes=None):
    """The model the loop trains (the `Objective` seam); `num_classes`: a classifier's, when known (export)."""
    raise NotImplementedError

  def train_transform(self):
    """Per-image augmentation on the host (`data.transforms`); a pure function of the example's seed."""
    return transforms.TrainTransform(self.config.data)

  def batch_hook(self, batch, rng):
    """Batch-level augmentation inside the jitted step (after the example keys are drawn); `rng` is its own."""
    del rng
    return batch

  def build_evaluators(self, model, train_source, mesh):
    """The evaluators that `config.eval.evaluators` names; those that read the labelled split only with one."""
    eval_source = data.eval_source(self.config)
    return {name: self.evaluators[name](self.config, model, train_source, eval_source, mesh)
            for name in self.config.eval.evaluators
            if eval_source is not None or not self.evaluators[name].needs_eval_split}


class Pretrain(Task):
  """Self-supervised pretraining with `config.objective`, watched by a kNN monitor on frozen features and, for a
  generative objective (MAGE), if asked, by the FID and IS of its samples ('fid', config.eval.fid)."""
  evaluators = {'knn': KnnEvaluator, 'fid': mage_generation.FidEvaluator}
  start_label = 'random init'

  @property
  def title(self):
    return self.config.objective

  def build_model(self, num_classes=None):
    return objectives.create(self.config)


class Tokenizer(Pretrain):
  """Training an image tokenizer (objective 'vqgan'), watched by its held-out reconstruction error and codebook
  usage ('reconstruction') and, if asked, a kNN monitor on its pooled codes ('knn')."""
  evaluators = {'reconstruction': ReconstructionEvaluator, 'knn': KnnEvaluator}

  @classmethod
  def validate(cls, config):
    super().validate(config)
    require(hasattr(objectives.OBJECTIVES[config.objective], 'reconstruct'),
            f"task 'tokenizer' trains a tokenizer: config.objective={config.objective!r} is not one (try 'vqgan')")


class Classification(Task):
  """A pretrained encoder (`config.init_from`: a run's workdir or an imported release) under a linear head,
  evaluated by top-1/top-5 on the eval split; the checkpoint of the best top-1 is kept beside the latest."""
  evaluators = {'classification': ClassificationEvaluator}
  start_label = 'initial'
  best_metric = 'eval/top1'

  @classmethod
  def validate(cls, config):
    super().validate(config)
    s = config[cls.section]
    require(s.pool in ('gap', 'cls'), f"config.{cls.section}.pool={s.pool!r} is not 'gap' or 'cls'")
    require(s.num_classes >= 0 and s.head_init_std > 0, f'config.{cls.section}: num_classes >= 0, head_init_std > 0')
    require(0 <= s.label_smoothing < 1, f'config.{cls.section}.label_smoothing must be in [0, 1)')
    require(bool(config.data.eval_split), f'task {config.task!r} needs a labelled config.data.eval_split')

  def num_classes(self):
    return self.config[self.section].num_classes or data.eval_source(self.config).num_classes

  def build_model(self, num_classes=None):
    return Classifier(self.config, self.config[self.section], num_classes or self.num_classes())


class Finetune(Classification):
  """MAE's end-to-end fine-tuning recipe (main_finetune.py): global pooling + fc_norm, a learned position
  table, drop path, RandAugment, random erasing, mixup/cutmix with label smoothing, AdamW with layer-wise lr
  decay (config.optim)."""
  section = 'finetune'

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        pool='gap',               # gap: fc_norm(mean of the patch tokens) | cls: norm, then the cls token
        posemb='learned',         # learned: initialised from the pretrained (fixed) table, resampled to the grid
        head_init_std=2e-5,       # trunc-normal std of the head's kernel (zero bias)
        num_classes=0,            # 0: the labelled split's number of classes
        label_smoothing=0.1,
        mixup=0.8,                # mixup alpha (0: off)
        cutmix=1.0,               # cutmix alpha (0: off)
        mixup_switch_prob=0.5,    # with both on: cutmix with this probability, else mixup (one choice per batch)
        randaugment='rand-m9-mstd0.5-inc1',  # timm's string; '' disables
        reprob=0.25,              # random erasing probability (pixel mode)
        crop_scale=(0.08, 1.0),
    ))

  @classmethod
  def validate(cls, config):
    super().validate(config)
    s = config.finetune
    require(s.mixup >= 0 and s.cutmix >= 0 and 0 <= s.mixup_switch_prob <= 1 and 0 <= s.reprob <= 1,
            'config.finetune: mixup >= 0, cutmix >= 0, mixup_switch_prob and reprob in [0, 1]')
    require(s.posemb in ('learned', 'sincos'), f"config.finetune.posemb={s.posemb!r} is not 'learned' or 'sincos'")
    lo, hi = s.crop_scale
    require(0 < lo <= hi <= 1, f'config.finetune.crop_scale={tuple(s.crop_scale)} must satisfy 0 < lo <= hi <= 1')
    try:
      transforms.FinetuneTransform(config.data, randaugment=s.randaugment, reprob=s.reprob, scale=tuple(s.crop_scale))
    except ValueError as e:
      require(False, f'config.finetune.randaugment={s.randaugment!r}: {e}')

  def train_transform(self):
    s = self.config.finetune
    return transforms.FinetuneTransform(self.config.data, randaugment=s.randaugment, reprob=s.reprob,
                                        scale=tuple(s.crop_scale))

  def batch_hook(self, batch, rng):
    s = self.config.finetune
    if not (s.mixup or s.cutmix):
      return batch
    return mixup.mixup_cutmix(batch, rng, mixup_alpha=s.mixup, cutmix_alpha=s.cutmix,
                              switch_prob=s.mixup_switch_prob, label_smoothing=s.label_smoothing,
                              num_classes=self.num_classes())


class Linprobe(Classification):
  """MAE's linear probe (main_linprobe.py): the frozen encoder's cls token through BatchNorm(affine=False)
  into a linear head, trained with LARS (config.optim), the reference's no-retry crop + flip."""
  section = 'linprobe'

  @staticmethod
  def default_config():
    return ml_collections.ConfigDict(dict(
        pool='cls',               # cls: MAE's probe | gap: the mean patch token through fc_norm
        posemb='sincos',          # the encoder's own fixed table (nothing of the encoder trains)
        head_init_std=0.01,
        num_classes=0,
        label_smoothing=0.0,
        batchnorm=True,           # BatchNorm1d(affine=False, eps=1e-6) in front of the head
        crop_scale=(0.08, 1.0),
    ))

  def train_transform(self):
    return transforms.LinprobeTransform(self.config.data, scale=tuple(self.config.linprobe.crop_scale))


def finetune_recipe(c, *, epochs, blr, layer_decay, drop_path, batch_size=1024):
  """MAE's fine-tuning recipe (facebookresearch/mae FINETUNE.md, main_finetune.py defaults) on config `c`:
  AdamW (0.9, 0.999), wd 0.05 except 1-D params, the position table and the cls token, layer-wise lr decay,
  lr = blr * batch / 256, 5 warm-up epochs then half-cycle cosine to 1e-6, drop path; the augmentation and
  label smoothing are `config.finetune`'s defaults."""
  c.task = 'finetune'
  c.eval.evaluators = ('classification',)
  c.model.drop_path_rate = drop_path
  c.train.update(batch_size=batch_size, epochs=epochs, warmup_epochs=5, blr=blr, min_lr=1e-6, weight_decay=0.05,
                 b1=0.9, b2=0.999)
  c.optim.update(name='adamw', wd_mults=(('encoder/(pos_embed|cls_token)', 0.0),), layer_decay=layer_decay)
  return c


def linprobe_recipe(c, *, epochs=90, batch_size=16384):
  """MAE's linear-probe recipe (main_linprobe.py, paper Table 10) on config `c`: the encoder frozen, LARS
  (momentum 0.9, trust 0.001) on the head, wd 0, blr 0.1, 10 warm-up epochs then cosine to 0."""
  c.task = 'linprobe'
  c.eval.evaluators = ('classification',)
  c.model.drop_path_rate = 0.0
  c.train.update(batch_size=batch_size, epochs=epochs, warmup_epochs=10, blr=0.1, min_lr=0.0, weight_decay=0.0)
  c.optim.update(name='lars', momentum=0.9, trust_coefficient=0.001, frozen=('encoder/.*',))
  return c


TASKS = {
    'pretrain': Pretrain,
    'finetune': Finetune,
    'linprobe': Linprobe,
    'tokenizer': Tokenizer,
}


def config_sections():
  return {cls.section: cls.default_config() for cls in TASKS.values() if cls.section}


def create(config):
  return TASKS[config.task](config)


def model_for_params(config, params):
  """The model of a run's `config` whose params are `params` (export, import): a classifier's number of
  classes comes from its head, so no dataset is opened."""
  head = params.get('head') if isinstance(params, dict) else None
  return create(config).build_model(head['bias'].shape[0] if head else None)
