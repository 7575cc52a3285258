"""MAE ViT-B/16 pretraining, the paper's recipe (He et al. 2022, Table 8; facebookresearch/mae PRETRAIN.md).

  python -m mae_jax.main --config=configs/mae_vitb.py --workdir=gs://BUCKET/mae_vitb

AdamW (0.9, 0.95), wd 0.05, blr 1.5e-4 (lr = blr * 4096 / 256 = 2.4e-3), batch 4096, 800 epochs with 40
warm-up epochs and a half-cycle cosine, mask ratio 0.75, norm-pix targets, decoder 512-d x 8 blocks x 16 heads,
RandomResizedCrop(224, scale=(0.2, 1)) + flip. Parameters: 111,907,840 with the fixed sin-cos tables.
Paper: fine-tune top-1 83.6 (1600 ep), linear probe 68.0.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000  # kNN monitor on 100k training images, before and after training
  c.model.variant = 'B/16'
  return c
