"""MAGE-C ViT-B/16: MAGE with a contrastive term (Li et al. 2023, section 3.3; its code was never released).

  python -m mae_jax.main --config=configs/magec_vitb.py --workdir=gs://BUCKET/magec_vitb

configs/mage_vitb.py's recipe (import the released tokenizer first, the same command) plus
config.mage.contrastive: two views per image drawn in the step (a random resized crop (0.5, 1) of the loader's
crop, flip, color jitter 0.4 with p 0.8, grayscale p 0.2), both trained on the token loss; their encoder
outputs, averaged over the kept tokens, through a 2048 -> 256 MLP head into SimCLR's InfoNCE at temperature 0.2,
weight 0.1. Weight and temperature are the paper's as we read it; the head, the augmentation and the pooling
are our choices: all UNVERIFIED (spec mage.md 1.7), each a config field. Two views double the step's cost.
Paper (MAGE-C, from memory, UNVERIFIED): linear probe 78.2 (ViT-B), 80.9 (ViT-L).
"""
from mae_jax.config import base_config
from mae_jax.objectives import mage


def get_config():
  c = mage.pretrain_recipe(base_config(), 'B/16', decoder_width=768)
  c.mage.contrastive.weight = 0.1
  return c
