"""MaskGIT's VQGAN tokenizer (the architecture of MAGE's tokenizer) trained on ImageNet-1k at 256 px.

  python -m mae_jax.main --config=configs/vqgan_imagenet.py --workdir=gs://BUCKET/vqgan_imagenet

Or import the released one (MAGE's `vqgan_jax_strongaug.ckpt`, trained by its authors in JAX):

  python -m mae_jax.export import --format=vqgan --in=vqgan_jax_strongaug.ckpt \
      --config=configs/vqgan_imagenet.py --out=vqgan_jax_strongaug.msgpack

Known (spec mage.md 1.1 and 4): the architecture (ch 128, ch_mult [1, 1, 2, 2, 4], 2 residual blocks per level,
no attention, GroupNorm 32, 256-d codes, 1024 entries: 256 px -> 16x16 ids; 54,515,587 params), [0, 1] pixels,
commitment cost 0.25; from MaskGIT's tokenizer config: a non-saturating GAN loss with generator weight 0.1,
perceptual (LPIPS) weight 0.1, an R1 penalty of 10 on a StyleGAN discriminator, an entropy loss (0.1), Adam
lr 1e-4 with betas (0, 0.99), batch 256, 1M steps, an EMA (polyak 0.999) of the weights. MAGE's tokenizer was
trained with "strong augmentation" (issue #6, not described) and reaches an rFID of about 3; MaskGIT's public
one 2.28.
Not known, our choices (UNVERIFIED): the reconstruction loss (L2, weight 1), the schedule (1 warm-up epoch
then cosine; 200 epochs = 1M steps of 256), no weight decay, the augmentation (RandomResizedCrop(0.2, 1) +
flip, MAGE's pretraining one), the discriminator's start (0) and its constant weight (MaskGIT's 0.1).
Not built: LPIPS, R1, the entropy loss, the StyleGAN discriminator (ours is taming's PatchGAN) and the weight
EMA; this is therefore not MaskGIT's recipe and its rFID is not the paper's.
"""
from mae_jax.config import base_config


def get_config():
  c = base_config()
  c.task = 'tokenizer'
  c.objective = 'vqgan'
  c.data.update(source='tfds', name='imagenet2012', eval_split='validation', img_size=256, interpolation='bilinear',
                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the tokenizer's [0, 1] pixels
  c.vqgan.update(l2_weight=1.0, l1_weight=0.0, beta=0.25, adv_weight=0.1, adv_weight_mode='constant',
                 disc_loss='non_saturating', disc_start=0, update_scheme='alternating')
  c.train.update(batch_size=256, epochs=200, warmup_epochs=1, blr=1e-4, weight_decay=0.0, b1=0.0, b2=0.99)
  c.eval.update(evaluators=('reconstruction',), batch_size=64)
  c.checkpoint.every_steps = 5000
  c.log.update(every_steps=100, images_every_steps=5000)
  return c
