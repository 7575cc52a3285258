"""A tiny VQGAN tokenizer on the embedded digits: the CPU demo, and the tokenizer of the MAGE CPU demo.

  python -m mae_jax.main --config=configs/vqgan_tiny_cpu.py --workdir=workdirs/vqgan_tiny

MaskGIT's architecture at `mae_jax.models.vqgan.tiny_config()` sizes: widths 16, 16, 32, one residual block
per level, 32x32 images -> 8x8 ids of a 128-entry codebook of 16-d codes (148,771 params). L1 + L2
reconstruction, the codebook and commitment losses, no discriminator; 20 epochs (460 steps at batch 64, a few
minutes on a CPU). Prints the held-out reconstruction error and codebook usage before and after training; on the
300 held-out digits: MSE 0.4607 -> 0.0042, L1 0.516 -> 0.045 (PSNR 23.7 dB), 109 of the 128 entries used
(perplexity 26.3).

The shipped tokenizer (`mae_jax/assets/vqgan_tiny_digits.msgpack`, `vqgan.TINY_DIGITS_TOKENIZER`) is this run,
converted with the export tool (to the reference's layout and back: only the tokenizer's params remain):

  python -m mae_jax.export --workdir=workdirs/vqgan_tiny --format=vqgan --out=workdirs/vqgan_tiny.safetensors
  python -m mae_jax.export import --format=vqgan --in=workdirs/vqgan_tiny.safetensors \
      --config=configs/vqgan_tiny_cpu.py --out=mae_jax/assets/vqgan_tiny_digits.msgpack
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.models import vqgan


def get_config():
  c = tiny_cpu_config()
  c.task = 'tokenizer'
  c.objective = 'vqgan'
  c.vqgan.update(vqgan.tiny_config())
  c.vqgan.update(l1_weight=1.0, l2_weight=1.0)
  c.data.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the tokenizer's [0, 1] pixels
  c.eval.evaluators = ('reconstruction',)
  c.train.update(epochs=20, warmup_epochs=1, blr=4e-3, weight_decay=0.0, b1=0.9, b2=0.99)  # lr 1e-3
  return c
