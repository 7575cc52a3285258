"""Linear probe of a pretrained MAE ViT-B/16 on ImageNet-1k: the reference recipe (main_linprobe.py, Table 10).

  python -m mae_jax.main --config=configs/linprobe_mae_vitb.py --workdir=gs://BUCKET/linprobe_mae_vitb \
      --config.init_from=gs://BUCKET/mae_vitb

The encoder frozen; its cls token through BatchNorm(affine=False, eps 1e-6) into a linear head (std 0.01);
LARS (momentum 0.9, trust 0.001), wd 0, batch 16384, blr 0.1 (lr 6.4), 90 epochs with 10 warm-up, cosine to
0; the reference's no-retry RandomResizedCrop + flip. Paper 68.0 top-1 (this PyTorch repo: 67.8; ~2.3 h on
32 V100 for 90 epochs). The batch's BatchNorm statistics are the global batch's on every mesh.
"""
from mae_jax.config import base_config
from mae_jax.tasks import linprobe_recipe


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')
  c.model.variant = 'B/16'
  c.linprobe.num_classes = 1000
  c.eval.every_steps = 1_281_167 // 16384
  return linprobe_recipe(c, epochs=90)
