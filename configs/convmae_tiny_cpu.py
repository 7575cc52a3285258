"""ConvMAE with a tiny ConvViT on the embedded digits: the CPU demo and the tests' config.

  python -m mae_jax.main --config=configs/convmae_tiny_cpu.py --workdir=workdirs/convmae_tiny

The MAE demo (`tiny_cpu_config`: 32x32 digits, 16 of 64 patches visible, a 2-layer 64-wide decoder, 20 epochs,
pixel targets) with the encoder swapped for `convnano/4`: stages 32/48/64 wide, 1/1/3 blocks, 4 heads. Its
stage patches are 1/2/2 (the total stride 4), so the final grid is the MAE demo's 8x8 of 4x4-pixel patches and
each masked patch is a 4x4 block of the 32x32 stage-1 map and a 2x2 block of the 16x16 stage-2 map: the ratios of
ConvViT-B (a 16x16 patch: 4x4 of the 56x56 map, 2x2 of the 28x28) at 1/4 of the resolution. v1: no cls token.
"""
from mae_jax.config import tiny_cpu_config


def get_config():
  c = tiny_cpu_config()
  c.model.variant = 'convnano/4'
  return c
