"""GAN-MAE with a tiny ViT on the embedded digits dataset: the CPU demo, same model and steps as mae_tiny_cpu.

  python -m mae_jax.main --config=configs/gan_mae_tiny_cpu.py --workdir=workdirs/gan_mae_tiny

A 4-layer, 64-wide ViT with 4x4 patches on 32x32 images (64 patches, 16 visible) shared by the generator
(with a 2-layer decoder) and the per-patch discriminator; 20 epochs (460 steps) like configs/mae_tiny_cpu.py.
Watch `gan/disc_balanced_acc` in metrics.jsonl (0.5 = chance) and the kNN top-1 printed at the end.
"""
from mae_jax.config import tiny_cpu_config


def get_config():
  c = tiny_cpu_config()
  c.objective = 'gan_mae'  # norm_pix_loss stays off: generated and real patches share the discriminator's pixel space
  return c
