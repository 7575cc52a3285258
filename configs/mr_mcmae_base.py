"""MR-MCMAE (ConvMAE v2): MR-MAE's mimic + reconstruct objective on the ConvViT-B, 400 epochs.

  python -m mae_jax.main --config=configs/mr_mcmae_base.py --workdir=gs://BUCKET/mr_mcmae_base

The teachers are imported first to the files named below, as for configs/mr_mae_vitb.py (docs/mr_mae.md).

configs/mr_mae_vitb.py (CLIP-B/16 + DINO-B/16 teachers on the visible tokens, the pixel loss on the masked ones;
every UNVERIFIED choice argued in docs/mr_mae.md) with the student of configs/convmae_base.py plus v2's cls
token (ConvMAE issue #19; its place and the fusion kept from v1 are UNVERIFIED, docs/convmae.md). The paper's
ICLR version: 85.8 fine-tune top-1 after 400 epochs; ConvMAE-v2-B's README: 85.7 after 200.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.objective = 'mr_mae'
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000
  c.model.variant = 'convB/16'
  c.model.convvit.cls_token = True
  c.train.epochs = 400
  c.mr_mae.teachers.clip.init_from = 'clip_vitb16.msgpack'
  c.mr_mae.teachers.dino.init_from = 'dino_vitb16.msgpack'
  return c
