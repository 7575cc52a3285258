"""ConvMAE ConvViT-B pretraining, the reference's recipe (Alpha-VL/ConvMAE PRETRAIN.md, models_convmae.py).

  python -m mae_jax.main --config=configs/convmae_base.py --workdir=gs://BUCKET/convmae_base

`convvit_base_patch16`: stages 256/384/768 wide, 2/2/11 blocks, patches 4/2/2 (56x56, 28x28, then the 14x14 grid),
12 heads, masked 5x5 depthwise convs in stages 1-2, the multi-scale fusion, no cls token (v1); MAE's decoder
(512-d x 8 x 16 heads) predicting 16x16x3 patches. 1600 epochs (40 warm-up), batch 2048 (the maintainer's
figure for the 1600-epoch model in issue #6; PRETRAIN.md's 128 x 24 GPUs would be 3072), blr 1.5e-4, AdamW
(0.9, 0.95), wd 0.05, mask 0.75, norm-pix targets, RandomResizedCrop(224, 0.2-1, bicubic) + flip: mae_vitb's.
Reference: fine-tune top-1 85.0, linear probe 70.9 (1600 ep).
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000
  c.model.variant = 'convB/16'
  c.train.update(batch_size=2048, epochs=1600)
  return c
