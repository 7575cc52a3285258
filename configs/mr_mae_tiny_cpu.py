"""MR-MAE with a tiny ViT on the embedded digits; the teacher is the MAE demo's encoder: the CPU demo.

  python -m mae_jax.main --config=configs/mae_tiny_cpu.py --workdir=workdirs/mae_tiny      # the teacher, first
  python -m mae_jax.main --config=configs/mr_mae_tiny_cpu.py --workdir=workdirs/mr_mae_tiny

No CLIP or DINO weights can be downloaded here, so the frozen teacher is an encoder this project pretrained:
the MAE demo's run (`teachers.mae.init_from`, its latest checkpoint's 'encoder'; any run or imported file of
the same ViT works). The student and schedule are the MAE demo's (`tiny_cpu_config`: nano/4 on 32x32, 16 of 64
patches visible, a 2-layer decoder, 20 epochs); the loss is its pixel loss on the masked patches plus the
mimic term of the teacher's last block (whitened, smooth-L1, a linear head) on the visible ones. Compare the
kNN top-1 printed at the end with the MAE demo's at the same step.
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.objectives.mr_mae import teacher_config


def get_config():
  c = tiny_cpu_config()
  c.objective = 'mr_mae'
  c.mr_mae.teachers.mae = teacher_config('vit')
  c.mr_mae.teachers.mae.update(variant='nano/4', init_from='workdirs/mae_tiny')
  c.mr_mae.use = ('mae',)
  return c
