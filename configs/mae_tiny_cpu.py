"""MAE with a tiny ViT on the embedded digits dataset: the CPU demo and the tests' config.

  python -m mae_jax.main --config=configs/mae_tiny_cpu.py --workdir=workdirs/mae_tiny

A 4-layer, 64-wide ViT with 4x4 patches on 32x32 images (64 patches, 16 visible) and a 2-layer decoder,
20 epochs (460 steps): `mae_jax.config.tiny_cpu_config`. Prints the kNN top-1 before and after training.
"""
from mae_jax.config import tiny_cpu_config


def get_config():
  return tiny_cpu_config()
