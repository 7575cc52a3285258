"""GAN-MAE ViT-B/16 pretraining for 200 epochs (Fei et al., CVPR 2023); everything else is MAE's recipe.

  python -m mae_jax.main --config=configs/gan_mae_vitb.py --workdir=gs://BUCKET/gan_mae_vitb \
      --config.data.source=tfds --config.data.name=imagenet2012

The paper states only the ViT-B/200-epoch setting; the rest follows MAE (He et al. 2022): AdamW (0.9, 0.95),
wd 0.05, blr 1.5e-4 (lr = blr * 4096 / 256 = 2.4e-3), batch 4096, 40 warm-up epochs and a half-cycle cosine,
mask ratio 0.75, decoder 512-d x 8 blocks x 16 heads, RandomResizedCrop(224, scale=(0.2, 1)) + flip.
GAN-MAE specifics (docs/gan_mae.md): pixel targets (norm_pix_loss off, required), a Dense(768 -> 1)
per-patch discriminator head on the shared encoder, alternating generator/discriminator AdamW updates,
VQGAN-style adaptive adversarial weight (factor 0.1). Parameters: MAE ViT-B's + 769 (the head).
Paper: fine-tune top-1 above MAE's 1600-epoch 83.6 (exact figure not verified); no linear probe reported to us.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.objective = 'gan_mae'
  c.model.variant = 'B/16'
  c.mae.norm_pix_loss = False
  c.train.epochs = 200
  return c
