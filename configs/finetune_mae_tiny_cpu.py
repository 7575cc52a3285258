"""Fine-tune the CPU demo's MAE encoder on the embedded digits: MAE's fine-tuning recipe at toy scale.

  python -m mae_jax.main --config=configs/mae_tiny_cpu.py --workdir=workdirs/mae_tiny     # pretrain first
  python -m mae_jax.main --config=configs/finetune_mae_tiny_cpu.py --workdir=workdirs/finetune_tiny \
      --config.init_from=workdirs/mae_tiny

The nano/4 ViT of configs/mae_tiny_cpu.py with global pooling, a learned position table started from the
pretrained one, layer decay 0.75, drop path 0.1, AdamW (0.9, 0.999), RandAugment, random erasing, mixup and
cutmix as in the reference; crops of 0.5-1 of the image (digits fill their frame); 20 epochs (460 steps) at
blr 5e-3 (a tiny model takes a larger step than ViT-B's 5e-4). Prints the validation
top-1 before and after; without --config.init_from it trains the same model from random init.
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.tasks import finetune_recipe


def get_config():
  c = finetune_recipe(tiny_cpu_config(), epochs=20, blr=5e-3, layer_decay=0.75, drop_path=0.1, batch_size=64)
  c.train.warmup_epochs = 1
  c.finetune.crop_scale = (0.5, 1.0)
  return c
