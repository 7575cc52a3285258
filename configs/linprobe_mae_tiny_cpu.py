"""Linear probe of the CPU demo's MAE encoder on the embedded digits: MAE's probe recipe at toy scale.

  python -m mae_jax.main --config=configs/mae_tiny_cpu.py --workdir=workdirs/mae_tiny     # pretrain first
  python -m mae_jax.main --config=configs/linprobe_mae_tiny_cpu.py --workdir=workdirs/linprobe_tiny \
      --config.init_from=workdirs/mae_tiny

The frozen nano/4 encoder's mean patch token (the reference's --global_pool; at this size MAE's cls token
summarises little: probing it gave 0.60 pretrained vs 0.63 random) through BatchNorm(affine=False) into a
linear head, LARS at the reference's lr 6.4, wd 0, the no-retry crop (0.5-1 of the image) + flip, 10 epochs. Prints the validation top-1 before and after; without
--config.init_from it probes a random encoder.
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.tasks import linprobe_recipe


def get_config():
  c = linprobe_recipe(tiny_cpu_config(), epochs=10, batch_size=64)
  # The reference's lr is 0.1 * 16384 / 256 = 6.4; LARS scales each step by trust * |w| / |g|, so the tiny run
  # keeps that lr (blr 25.6 at batch 64) rather than the 64/256 of it that blr 0.1 would give.
  c.train.update(warmup_epochs=1, blr=6.4 * 256 / 64)
  c.linprobe.crop_scale = (0.5, 1.0)
  c.linprobe.pool = 'gap'
  return c
