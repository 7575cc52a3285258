"""GAN-MAE with a tiny ViT on the embedded digits dataset: the CPU demo, same model and steps as mae_tiny_cpu.

  python -m mae_jax.main --config=configs/gan_mae_tiny_cpu.py --workdir=workdirs/gan_mae_tiny

A 4-layer, 64-wide ViT with 4x4 patches on 32x32 images (64 patches, 16 visible) shared by the generator
(with a 2-layer decoder) and the per-patch discriminator; 20 epochs (460 steps) like configs/mae_tiny_cpu.py.
Watch `gan/disc_balanced_acc` in metrics.jsonl (0.5 = chance) and the kNN top-1 printed at the end.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.objective = 'gan_mae'
  c.model.variant = 'nano/4'
  c.model.decoder.update(width=64, depth=2, num_heads=4)
  c.mae.norm_pix_loss = False  # required: generated and real patches share the discriminator's pixel space
  c.data.img_size = 32
  c.data.crop_scale = (0.5, 1.0)  # digits are centred, tight scans: a 0.2 crop often cuts the digit away
  c.train.update(batch_size=64, epochs=20, warmup_epochs=2, blr=1.5e-4 * 10)
  c.checkpoint.every_steps = 100
  c.log.update(every_steps=20, images_every_steps=200)
  c.eval.knn_every_steps = 0
  return c
