"""Fine-tune a pretrained MAE ViT-B/16 on ImageNet-1k: the reference recipe (facebookresearch/mae FINETUNE.md).

  python -m mae_jax.main --config=configs/finetune_mae_vitb.py --workdir=gs://BUCKET/finetune_mae_vitb \
      --config.init_from=gs://BUCKET/mae_vitb          # or an imported release: init.msgpack

100 epochs, batch 1024, blr 5e-4 (lr 2e-3), layer decay 0.65, wd 0.05, drop path 0.1, AdamW (0.9, 0.999),
5 warm-up epochs, cosine to 1e-6; RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8,
cutmix 1.0, label smoothing 0.1; global-average pooling + fc_norm, a learned position table initialised from
the pretrained one. Top-1/top-5 on the validation split every epoch; the best checkpoint is kept.
Reference: 83.6 top-1 from the 1600-epoch norm-pix model (4 seeds 83.63/83.66/83.52/83.46; ~7 h on 32 V100).
"""
from mae_jax.config import base_config
from mae_jax.tasks import finetune_recipe


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.model.variant = 'B/16'
  c.finetune.num_classes = 1000
  c.eval.every_steps = 1_281_167 // 1024  # one epoch
  return finetune_recipe(c, epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1)
