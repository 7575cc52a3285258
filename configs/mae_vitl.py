"""MAE ViT-L/16 pretraining, the paper's recipe (facebookresearch/mae PRETRAIN.md).

  python -m mae_jax.main --config=configs/mae_vitl.py --workdir=gs://BUCKET/mae_vitl

Batch 4096, blr 1.5e-4, wd 0.05, 800 epochs (40 warm-up), norm-pix, mask 0.75, decoder 512 x 8.
Parameters: 329,541,888 with the fixed sin-cos tables.
Paper: fine-tune 85.4 (800 ep; 85.9 at 1600), linear probe 75.8; ~15.4 h on 128 TPU-v3 cores for 800 epochs.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000  # kNN monitor on 100k training images, before and after training
  c.model.variant = 'L/16'
  return c
