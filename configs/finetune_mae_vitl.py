"""Fine-tune a pretrained MAE ViT-L/16 on ImageNet-1k: the reference recipe (facebookresearch/mae FINETUNE.md).

  python -m mae_jax.main --config=configs/finetune_mae_vitl.py --workdir=gs://BUCKET/finetune_mae_vitl \
      --config.init_from=gs://BUCKET/mae_vitl

50 epochs, batch 1024, blr 1e-3 (lr 4e-3), layer decay 0.75, wd 0.05, drop path 0.2; otherwise as ViT-B
(configs/finetune_mae_vitb.py). Reference: 85.9 top-1 (85.95/85.87/85.76/85.88; ~8.9 h on 32 V100).
"""
from mae_jax.config import base_config
from mae_jax.tasks import finetune_recipe


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')
  c.model.variant = 'L/16'
  c.finetune.num_classes = 1000
  c.eval.every_steps = 1_281_167 // 1024
  return finetune_recipe(c, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2)
