"""MAGE ViT-B/16 pretraining, the paper's recipe (Li et al. 2023; LTH14/mage README and main_pretrain.py).

  python -m mae_jax.export import --format=vqgan --in=vqgan_jax_strongaug.ckpt --config=configs/mage_vitb.py \
      --config.objective=vqgan --out=vqgan_jax_strongaug.msgpack
  python -m mae_jax.main --config=configs/mage_vitb.py --workdir=gs://BUCKET/mage_vitb

The frozen tokenizer is the released VQGAN (vqgan_jax_strongaug.ckpt, MaskGIT's architecture: 256 px -> 16x16
ids of 1024), imported first (the path: --config.mage.tokenizer). 256 px, bilinear RandomResizedCrop(0.2, 1) +
flip, [0, 1] input; batch 4096, AdamW (0.9, 0.95), blr 1.5e-4 (lr 2.4e-3), wd 0.05 (not on 1-D params), 40
warm-up epochs, 1600 epochs, gradient clipping 3.0; mask ratio ~ N(0.55, 0.25) truncated to [0.5, 1], 128 of
256 tokens dropped; dropout 0.1; decoder 768-d x 8 blocks x 16 heads. Parameters: 144,896,745 (encoder with
its token embedding 86,810,112); the reference's 146,474,217 add 1,577,472 it never uses (sin-cos tables,
cls/mask tokens, patch embedding, pixel head), which the 'mage-official' export writes.
Paper (README, 1600 epochs): unconditional generation FID 11.1, IS 81.2; linear probe 74.7; fine-tune 82.5.
Final train loss about 5.76 (LTH14/mage issue #18).
"""
from mae_jax.config import base_config
from mae_jax.objectives import mage


def get_config():
  return mage.pretrain_recipe(base_config(), 'B/16', decoder_width=768)
