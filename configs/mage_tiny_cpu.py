"""MAGE with a tiny ViT on the embedded digits and the shipped tiny tokenizer: the CPU demo, a few minutes.

  python -m mae_jax.main --config=configs/mage_tiny_cpu.py --workdir=workdirs/mage_tiny

The tokenizer is `mae_jax/assets/vqgan_tiny_digits.msgpack` (configs/vqgan_tiny_cpu.py: 32x32 images -> 8x8
ids of 128, vocabulary 128 + 1000 + 1); the model and schedule are the MAE demo's (`tiny_cpu_config`: a
4-layer, 64-wide ViT whose 4-pixel patch is the tokenizer's, a 2-layer decoder, 20 epochs) under MAGE's recipe
(mask ratio ~ N(0.55, 0.25) on [0.5, 1], 32 of 64 tokens dropped, dropout 0.1, clipping 3.0, [0, 1] input,
bilinear crops). Prints the kNN top-1 of the encoder before and after training.
"""
from mae_jax.config import tiny_cpu_config
from mae_jax.models import vqgan


def get_config():
  c = tiny_cpu_config()
  c.objective = 'mage'
  c.model.dropout = 0.1
  c.vqgan.update(vqgan.tiny_config())
  c.mage.tokenizer = vqgan.TINY_DIGITS_TOKENIZER
  c.data.update(interpolation='bilinear', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  c.train.grad_clip = 3.0
  return c
