"""Linear probe of a pretrained MAE ViT-L/16 on ImageNet-1k: the reference recipe (main_linprobe.py, Table 10).

  python -m mae_jax.main --config=configs/linprobe_mae_vitl.py --workdir=gs://BUCKET/linprobe_mae_vitl \
      --config.init_from=gs://BUCKET/mae_vitl

As ViT-B (configs/linprobe_mae_vitb.py); 90 epochs (the reference notes 50 suffice for L/H).
Paper 75.8 top-1 (this PyTorch repo: 76.0).
"""
from mae_jax.config import base_config
from mae_jax.tasks import linprobe_recipe


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')
  c.model.variant = 'L/16'
  c.linprobe.num_classes = 1000
  c.eval.every_steps = 1_281_167 // 16384
  return linprobe_recipe(c, epochs=90)
