"""MAE ViT-H/14 pretraining, the paper's recipe.

  python -m mae_jax.main --config=configs/mae_vith.py --workdir=gs://BUCKET/mae_vith --config.mesh.data=1 --config.mesh.fsdp=-1

Batch 4096, blr 1.5e-4, wd 0.05, 1600 epochs (40 warm-up), norm-pix, mask 0.75, decoder 512 x 8, 16x16 patches
of 14 px. Parameters: 657,074,508 with the fixed sin-cos tables. FSDP is the natural mesh at this size.
Paper: fine-tune 86.9 (87.8 at 448 px), linear probe 76.6; ~34.5 h on 128 TPU-v3 cores for 800 epochs.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000  # kNN monitor on 100k training images, before and after training
  c.model.variant = 'H/14'
  c.train.epochs = 1600
  return c
