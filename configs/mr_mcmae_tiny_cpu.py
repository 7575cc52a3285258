"""MR-MCMAE with a tiny ConvViT on the embedded digits; the teacher is the MAE demo's encoder: the CPU demo.

  python -m mae_jax.main --config=configs/mae_tiny_cpu.py --workdir=workdirs/mae_tiny      # the teacher, first
  python -m mae_jax.main --config=configs/mr_mcmae_tiny_cpu.py --workdir=workdirs/mr_mcmae_tiny

configs/mr_mae_tiny_cpu.py (the same self-pretrained nano/4 teacher, mimic and pixel terms, schedule) with the
student of configs/convmae_tiny_cpu.py (`convnano/4`, stage patches 1/2/2: the teacher's 8x8 grid) and, as
ConvMAE v2, a cls token. Compare its kNN top-1 with MR-MAE's and MAE's at the same step (docs/convmae.md).
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.objectives.mr_mae import teacher_config


def get_config():
  c = tiny_cpu_config()
  c.objective = 'mr_mae'
  c.model.variant = 'convnano/4'
  c.model.convvit.cls_token = True
  c.mr_mae.teachers.mae = teacher_config('vit')
  c.mr_mae.teachers.mae.update(variant='nano/4', init_from='workdirs/mae_tiny')
  c.mr_mae.use = ('mae',)
  return c
