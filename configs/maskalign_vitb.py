"""MaskAlign ViT-B/16 (Xue et al., CVPR 2023; OpenDriveLab/maskalign README) as an MR-MAE preset: mimic only.

  python -m mae_jax.main --config=configs/maskalign_vitb.py --workdir=gs://BUCKET/maskalign_vitb

The CLIP teacher is imported first (mae_jax.export's `import --format=clip-hf`, docs/mr_mae.md).

The README's recipe: CLIP ViT-B/16 teacher, no decoder and no pixel loss, whitened targets, smooth-L1, a linear
head per teacher layer, mask ratio 0.7, 200 epochs with 20 warm-up, blr 1.5e-4, min lr 1e-5, drop path 0.1,
batch 1024, AdamW (0.9, 0.95); 85.4 fine-tune top-1. `--loss_weights top5` is the last five blocks here, each
weighted equally. Not built (docs/mr_mae.md): its attention-guided masking (random masking here) and its learned
fusion of the student's layers (every head reads the encoder's output).
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.objective = 'mr_mae'
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')
  c.eval.knn_bank_size = 100_000
  c.model.update(variant='B/16', drop_path_rate=0.1)
  c.mae.mask_ratio = 0.7
  c.train.update(batch_size=1024, epochs=200, warmup_epochs=20, min_lr=1e-5)
  c.mr_mae.update(use=('clip',), mimic_only=True)
  c.mr_mae.teachers.clip.update(init_from='clip_vitb16.msgpack', layers=(8, 9, 10, 11, 12), proj_dim=0)
  return c
