"""MR-MAE ViT-B/16, 200 epochs: MAE's recipe plus mimicking frozen CLIP ViT-B/16 and DINO ViT-B/16 (docs/mr_mae.md).

  python -m mae_jax.main --config=configs/mr_mae_vitb.py --workdir=gs://BUCKET/mr_mae_vitb
  python -m mae_jax.bench --config=configs/mr_mae_vitb.py   # the step's cost, and each teacher's forward alone

The teachers are imported first, to the files named below (mae_jax.export's `import --format=clip-hf` and
`--format=dino`, without --config: docs/mr_mae.md, "Teacher files"); the bench uses random stand-ins.

Fixed by the paper: the mimic loss on the visible 25% of the encoder's tokens (CLIP and DINO), MAE's pixel loss
on the masked 75% after the decoder; 200 epochs (fine-tune top-1 85.0). Not published, so MAE's recipe
(AdamW 0.9/0.95, wd 0.05, blr 1.5e-4, batch 4096, 40 warm-up epochs, mask 0.75, norm-pix, 512 x 8 decoder) and
MaskAlign's targets (the last block before the final norm, whitened, smooth-L1, one linear head per teacher,
weights 1): docs/mr_mae.md lists what to re-check against the paper.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.objective = 'mr_mae'
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation')  # docs/data.md: preparing it
  c.eval.knn_bank_size = 100_000
  c.model.variant = 'B/16'
  c.train.epochs = 200
  c.mr_mae.teachers.clip.init_from = 'clip_vitb16.msgpack'
  c.mr_mae.teachers.dino.init_from = 'dino_vitb16.msgpack'
  return c
