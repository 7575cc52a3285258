"""Fine-tune a pretrained MAE ViT-H/14 on ImageNet-1k: the reference recipe (facebookresearch/mae FINETUNE.md).

  python -m mae_jax.main --config=configs/finetune_mae_vith.py --workdir=gs://BUCKET/finetune_mae_vith \
      --config.init_from=gs://BUCKET/mae_vith --config.mesh.data=1 --config.mesh.fsdp=-1

50 epochs, batch 1024, blr 1e-3, layer decay 0.75, wd 0.05, drop path 0.3; otherwise as ViT-B.
Reference: 86.9 top-1 (87.8 at 448 px; ~13 h on 64 V100).
"""
from mae_jax.config import base_config
from mae_jax.tasks import finetune_recipe


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')
  c.model.variant = 'H/14'
  c.finetune.num_classes = 1000
  c.eval.every_steps = 1_281_167 // 1024
  return finetune_recipe(c, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3)
