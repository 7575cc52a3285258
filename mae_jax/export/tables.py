"""Key tables: one per PyTorch format, as data.

A rule is (jax path, torch key, kind). `{i}` in both stands for a block index. The kind names how a value
changes between the two layouts (`KINDS`), or marks a position table that is fixed in JAX (not a param):
  'sincos': fixed in the target too (the reference's frozen `pos_embed`); recomputed for another grid.
  'posemb': learned in the target (timm); our fixed table is its initial value, resized bicubically for
            another grid, as the reference's fine-tuning and timm's loader do.
A format's scope is the set of top-level modules its rules name; `engine.py` applies a table either way.
A new objective's format (GAN-MAE, MAGE, MR-MAE) is a new entry in `FORMATS`.
"""
import numpy as np

from mae_jax.models.vit import posemb_sincos_2d

KINDS = {  # kind: (jax -> torch, torch -> jax)
    'copy': (lambda x: x, lambda x: x),
    'dense': (np.transpose, np.transpose),  # flax (in, out) <-> torch Linear (out, in)
    'conv': (lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0)),  # (p, p, c, D) <-> (D, c, p, p)
}
POSITION_KINDS = ('sincos', 'posemb')


def _linear(jax, torch):
  return [(f'{jax}/kernel', f'{torch}.weight', 'dense'), (f'{jax}/bias', f'{torch}.bias', 'copy')]


def _norm(jax, torch):
  return [(f'{jax}/scale', f'{torch}.weight', 'copy'), (f'{jax}/bias', f'{torch}.bias', 'copy')]


def _block(jax, torch):
  """timm's `Block`: fused qkv with [q | k | v] rows, the same order as our fused kernel's columns."""
  return [*_norm(f'{jax}/norm1', f'{torch}.norm1'), *_linear(f'{jax}/attn/qkv', f'{torch}.attn.qkv'),
          *_linear(f'{jax}/attn/proj', f'{torch}.attn.proj'), *_norm(f'{jax}/norm2', f'{torch}.norm2'),
          *_linear(f'{jax}/mlp/fc1', f'{torch}.mlp.fc1'), *_linear(f'{jax}/mlp/fc2', f'{torch}.mlp.fc2')]


def _encoder(pos_kind, norm='norm'):
  return [('encoder/cls_token', 'cls_token', 'copy'),
          ('encoder/pos_embed', 'pos_embed', pos_kind),
          ('encoder/patch_embed/proj/kernel', 'patch_embed.proj.weight', 'conv'),
          ('encoder/patch_embed/proj/bias', 'patch_embed.proj.bias', 'copy'),
          *_block('encoder/blocks_{i}', 'blocks.{i}'),
          *_norm('encoder/norm', norm)]


MAE_DECODER = [
    ('decoder/mask_token', 'mask_token', 'copy'),
    ('decoder/decoder_pos_embed', 'decoder_pos_embed', 'sincos'),
    *_linear('decoder/decoder_embed', 'decoder_embed'),
    *_block('decoder/decoder_blocks_{i}', 'decoder_blocks.{i}'),
    *_norm('decoder/decoder_norm', 'decoder_norm'),
    *_linear('decoder/decoder_pred', 'decoder_pred'),
]
HEAD = _linear('head', 'head')  # only when the params (or the export options) have a classifier

FORMATS = {
    # facebookresearch/mae `MaskedAutoencoderViT` (checkpoint-*.pth, mae_pretrain_vit_*[_full].pth,
    # mae_visualize_vit_*.pth); the encoder-only releases are this table with the decoder keys missing.
    'mae-official': _encoder('sincos') + MAE_DECODER,
    # timm `VisionTransformer` (class_token=True, global_pool='token'): features = norm(x)[:, 0].
    'timm-vit': _encoder('posemb') + HEAD,
    # timm `VisionTransformer(global_pool='avg', fc_norm=True)` (MAE fine-tuning's default): features =
    # fc_norm(mean(x[:, 1:])). A pretrained encoder's final norm becomes fc_norm (MAE's fine-tuning re-initialises
    # it anyway); a fine-tuned classifier (pool='gap') has its own fc_norm and a learned pos_embed.
    'timm-vit-avg': _encoder('posemb', norm='fc_norm') + _norm('encoder/fc_norm', 'fc_norm') + HEAD,
    # facebookresearch/mae `models_vit.VisionTransformer(global_pool=True)`, the fine-tuned releases
    # (mae_finetuned_vit_*.pth): the same keys as timm's global-pool model (`fc_norm`, `head`, learned `pos_embed`).
    'mae-finetuned': _encoder('posemb', norm='fc_norm') + _norm('encoder/fc_norm', 'fc_norm') + HEAD,
    # GAN-MAE (no reference code exists): the MAE pretraining model plus the discriminator's per-patch head,
    # named `disc_head` like our param (a torch.nn.Linear(D, 1)); the encoder is shared by both players.
    'gan-mae': _encoder('sincos') + MAE_DECODER + _linear('disc_head', 'disc_head'),
}


def scope(fmt):
  """The top-level param modules a format covers; the rest of a params tree is not its business."""
  return {jax.split('/')[0] for jax, _, _ in FORMATS[fmt]}


def fixed_tables(objective):
  """The objective's fixed sin-cos tables (1, 1 + L, D), keyed by the jax paths the rules use (a learned
  table is a param instead, exported and imported like one)."""
  out = {}
  if objective.encoder.posemb == 'sincos':
    out['encoder/pos_embed'] = posemb_sincos_2d(objective.encoder.width, objective.encoder.grid_size)[None]
  decoder = getattr(objective, 'decoder', None)
  if decoder is not None:
    out['decoder/decoder_pos_embed'] = posemb_sincos_2d(decoder.width, decoder.grid_size)[None]
  return out
