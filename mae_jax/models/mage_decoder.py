"""MAGE's decoder and MLM head (Li et al. 2023, LTH14/mage `models_mage.py`): MAGE, MAGE-C and generation.

The encoder saw the kept tokens only, in ascending position order with the fake-class token first. The
decoder embeds them and pads every other position, and every masked one, with the embedded position-0
output (the reference's `pad_with_cls_token`, not a learned mask token), adds its own learned position
table, runs its blocks and `decoder_norm`, and predicts logits over the whole vocabulary with the MlmLayer,
whose output projection is the encoder's word embedding, tied without gradient. Names follow the reference
(`decoder_embed`, `decoder_pos_embed_learned`, `decoder_blocks_i`, `decoder_norm`, `mlm_layer/{fc, ln, bias}`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mae_jax.models import masking
from mae_jax.models.vit import dense_init, learned_table_init, make_blocks, token_init


class MlmLayer(nn.Module):
  """fc -> exact GELU -> LayerNorm (eps 1e-5, torch's default, unlike the blocks' 1e-6) -> x @ word
  embeddings^T (stop-gradient: the reference ties with `.detach()`) + bias. Logits in fp32."""
  vocab_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, word_embeddings):
    x = nn.Dense(word_embeddings.shape[-1], dtype=self.dtype, kernel_init=dense_init, name='fc')(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln')(nn.gelu(x, approximate=False))
    emb = jax.lax.stop_gradient(word_embeddings).astype(x.dtype)
    logits = jnp.einsum('nld,vd->nlv', x, emb, preferred_element_type=jnp.float32)
    return logits + self.param('bias', nn.initializers.zeros, (self.vocab_size,))


class MAGEDecoder(nn.Module):
  grid_size: tuple  # the token grid (gh, gw); the decoder's positions are the fake-class one, then the grid
  vocab_size: int
  width: int = 768
  depth: int = 8
  num_heads: int = 16
  mlp_ratio: float = 4.0
  dropout: float = 0.0
  attn_dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: Any = False
  pos_init: str = 'normal'  # the learned table's init: the reference's 'normal' (0.02) or 'sincos'

  def setup(self):
    self.decoder_embed = nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init)
    init = learned_table_init(self.pos_init, self.grid_size, 1, token_init)
    num_tokens = 1 + self.grid_size[0] * self.grid_size[1]
    self.decoder_pos_embed_learned = self.param('decoder_pos_embed_learned', init, (1, num_tokens, self.width))
    self.decoder_blocks = make_blocks(self.depth, self.num_heads, self.mlp_ratio, 0.0, self.dropout, self.dtype,
                                      self.remat, self.attn_dropout)
    self.decoder_norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)
    self.mlm_layer = MlmLayer(self.vocab_size, self.dtype)

  def __call__(self, latent, kept, masked, word_embeddings, train: bool = False):
    """Logits (N, 1 + L, vocab) in fp32.

    Args:
      latent: (N, K, D_enc) the encoder's output at the kept positions, ascending, position 0 first.
      kept: (N, 1 + L) bool, the positions the encoder saw (K of them, position 0 included).
      masked: (N, 1 + L) bool, the positions whose token is [MASK] (never position 0).
      word_embeddings: (vocab, D_enc) the encoder's word embedding, the MlmLayer's output projection.
    """
    x = self.decoder_embed(latent)
    # latent's row of each kept position: kept positions are ascending, so it is their running count - 1.
    rows = jnp.clip(jnp.cumsum(kept, axis=1) - 1, 0, x.shape[1] - 1)
    x = jnp.where((kept & ~masked)[..., None], masking.gather(x, rows), x[:, :1])
    x = x + self.decoder_pos_embed_learned.astype(x.dtype)
    for block in self.decoder_blocks:
      x = block(x, train)
    return self.mlm_layer(self.decoder_norm(x), word_embeddings)
