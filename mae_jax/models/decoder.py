"""MAE's lightweight decoder, shared by every objective that reconstructs patches.

It embeds the encoder's visible tokens, fills the removed positions with a learned mask token, restores
the original order, adds its own fixed sin-cos table, and predicts one vector per patch. Names follow the
reference (`decoder_embed`, `mask_token`, `decoder_blocks_i`, `decoder_norm`, `decoder_pred`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mae_jax.models import masking
from mae_jax.models.vit import dense_init, make_blocks, posemb_sincos_2d, token_init


class MAEDecoder(nn.Module):
  grid_size: tuple
  out_dim: int
  width: int = 512
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  remat: bool = False
  cls_token: bool = True  # the latent's token 0 is a cls token (MAE's); ConvMAE v1's encoder has none

  def setup(self):
    self.decoder_embed = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)
    self.mask_token = self.param('mask_token', token_init, (1, 1, self.width))
    self.decoder_pos_embed = jnp.asarray(posemb_sincos_2d(self.width, self.grid_size, self.cls_token))
    self.decoder_blocks = make_blocks(self.depth, self.num_heads, self.mlp_ratio, 0.0, 0.0, self.dtype, self.remat)
    self.decoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.decoder_pred = nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=dense_init)

  def __call__(self, latent, ids_restore, train: bool = False):
    """latent (N, [1 +] kept, D_enc), the cls token first if any -> predictions (N, L, out_dim), in fp32."""
    prefix = int(self.cls_token)
    x = self.decoder_embed(latent)
    patches = masking.unshuffle(x[:, prefix:], self.mask_token, ids_restore)
    x = jnp.concatenate([x[:, :prefix], patches], axis=1) + self.decoder_pos_embed[None].astype(x.dtype)
    for block in self.decoder_blocks:
      x = block(x, train)
    x = self.decoder_pred(self.decoder_norm(x))
    return x[:, prefix:].astype(jnp.float32)
