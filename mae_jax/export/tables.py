"""Key tables: one per PyTorch format, as data.

A rule is (jax path, torch key, kind). `{i}` in both stands for a block index. The kind names how a value
changes between the two layouts (`KINDS`), or marks a position table that is fixed in JAX (not a param):
  'sincos': fixed in the target too (the reference's frozen `pos_embed`); recomputed for another grid.
  'posemb': learned in the target (timm); our fixed table is its initial value, resized bicubically for
            another grid, as the reference's fine-tuning and timm's loader do.
or marks an entry of the reference's state_dict that its model never uses (`UNUSED`, MAGE's dead params and
buffers): export writes the objective's `unused_reference_tensors()` under the rule's jax path, so that the
reference's strict `load_state_dict` succeeds; import checks its shape and drops it.
A format's scope is the set of top-level modules its rules name; `engine.py` applies a table either way.
A new objective's format (GAN-MAE, MAGE, MR-MAE) is a new entry in `FORMATS`.
"""
import numpy as np

from mae_jax.models import vqgan
from mae_jax.models.decoder import MAEDecoder
from mae_jax.models.vit import posemb_sincos_2d

KINDS = {  # kind: (jax -> torch, torch -> jax)
    'copy': (lambda x: x, lambda x: x),
    'dense': (np.transpose, np.transpose),  # flax (in, out) <-> torch Linear (out, in)
    'conv': (lambda k: k.transpose(3, 2, 0, 1), lambda w: w.transpose(2, 3, 1, 0)),  # (p, p, c, D) <-> (D, c, p, p)
    'embedding_table': (lambda t: t[0], lambda w: w[None]),  # a learned (1, L, D) table <-> nn.Embedding (L, D)
    'broadcast_bias': (lambda b: b[None, None], lambda b: b[0, 0]),  # (V,) <-> a (1, 1, V) nn.Parameter
    'token': (lambda t: t[0, 0], lambda w: w[None, None]),  # a (1, 1, D) cls param <-> CLIP's (D,) class_embedding
}
POSITION_KINDS = ('sincos', 'posemb')
UNUSED = 'unused'


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



def _conv(jax, torch, bias=True):
  return [(f'{jax}/kernel', f'{torch}.weight', 'conv')] + ([(f'{jax}/bias', f'{torch}.bias', 'copy')] if bias else [])


def _resblock(jax, torch):
  """MAGE's taming `ResnetBlock`: bias-free convs; `nin_shortcut` exists only where the width changes."""
  return [*_norm(f'{jax}/norm1', f'{torch}.norm1'), *_conv(f'{jax}/conv1', f'{torch}.conv1', bias=False),
          *_norm(f'{jax}/norm2', f'{torch}.norm2'), *_conv(f'{jax}/conv2', f'{torch}.conv2', bias=False),
          *_conv(f'{jax}/nin_shortcut', f'{torch}.nin_shortcut', bias=False)]


def _vqgan(jax, torch):
  """MaskGIT's VQGAN as MAGE's taming port names it (`mae_jax.models.vqgan`), params under `jax`, keys under
  `torch` ('' for the tokenizer file itself, 'vqgan' inside MAGE's checkpoints). `{i}` is the block index."""
  torch = f'{torch}.' if torch else ''
  enc, dec, tenc, tdec = f'{jax}/encoder', f'{jax}/decoder', f'{torch}encoder', f'{torch}decoder'
  mid = lambda j, t: [rule for b in (1, 2) for rule in _resblock(f'{j}/mid/block_{b}', f'{t}.mid.block_{b}')]
  rules = _conv(f'{enc}/conv_in', f'{tenc}.conv_in', bias=False)
  for level in range(vqgan.MAX_LEVELS):  # a rule that matches nothing is harmless
    rules += _resblock(f'{enc}/down_{level}/block_{{i}}', f'{tenc}.down.{level}.block.{{i}}')
  rules += [*mid(enc, tenc), *_norm(f'{enc}/norm_out', f'{tenc}.norm_out'),
            *_conv(f'{enc}/conv_out', f'{tenc}.conv_out'), *_conv(f'{dec}/conv_in', f'{tdec}.conv_in'), *mid(dec, tdec)]
  for level in range(vqgan.MAX_LEVELS):
    rules += [*_resblock(f'{dec}/up_{level}/block_{{i}}', f'{tdec}.up.{level}.block.{{i}}'),
              *_conv(f'{dec}/up_{level}/upsample/conv', f'{tdec}.up.{level}.upsample.conv')]
  return rules + [*_norm(f'{dec}/norm_out', f'{tdec}.norm_out'), *_conv(f'{dec}/conv_out', f'{tdec}.conv_out'),
                  (f'{jax}/quantize/embedding', f'{torch}quantize.embedding.weight', 'copy')]


def _cblock(jax, torch):
  """ConvMAE's `CBlock`: its depthwise 5x5 conv is named `attn`; `mlp` is CMlp's 1x1 convs."""
  return [*_norm(f'{jax}/norm1', f'{torch}.norm1'), *_conv(f'{jax}/conv1', f'{torch}.conv1'),
          *_conv(f'{jax}/attn', f'{torch}.attn'), *_conv(f'{jax}/conv2', f'{torch}.conv2'),
          *_norm(f'{jax}/norm2', f'{torch}.norm2'), *_conv(f'{jax}/mlp/fc1', f'{torch}.mlp.fc1'),
          *_conv(f'{jax}/mlp/fc2', f'{torch}.mlp.fc2')]


def _convvit(pos_kind, norm='norm'):
  """ConvMAE's ConvViT encoder (`mae_jax.models.convvit`): `patch_embed1..3` (conv + LayerNorm), `patch_embed4`
  (Linear), `blocks1`/`blocks2` (CBlocks), `blocks3` (timm-style Blocks); conv weights OIHW."""
  rules = [('encoder/cls_token', 'cls_token', 'copy'), ('encoder/pos_embed', 'pos_embed', pos_kind)]
  for stage in (1, 2, 3):
    rules += [*_conv(f'encoder/patch_embed{stage}/proj', f'patch_embed{stage}.proj'),
              *_norm(f'encoder/patch_embed{stage}/norm', f'patch_embed{stage}.norm')]
  return [*rules, *_linear('encoder/patch_embed4', 'patch_embed4'), *_cblock('encoder/blocks1_{i}', 'blocks1.{i}'),
          *_cblock('encoder/blocks2_{i}', 'blocks2.{i}'), *_block('encoder/blocks3_{i}', 'blocks3.{i}'),
          *_norm('encoder/norm', norm)]


def _mage():
  """LTH14/mage `MaskedGenerativeEncoderViT` (mage-vit{b,l}-1600.pth, spec mage.md 1.9): BertEmbeddings, the
  blocks, the decoder with its MlmLayer, the frozen VQGAN under `vqgan.` (the loop's params['tokenizer']),
  and the entries the reference never uses (`UNUSED`)."""
  unused = [('encoder/cls_token', 'cls_token'), ('encoder/sincos_pos_embed', 'pos_embed'),
            ('encoder/patch_embed/proj/kernel', 'patch_embed.proj.weight'),
            ('encoder/patch_embed/proj/bias', 'patch_embed.proj.bias'), ('encoder/position_ids', 'token_emb.position_ids'),
            ('decoder/mask_token', 'mask_token'), ('decoder/decoder_pos_embed', 'decoder_pos_embed'),
            ('decoder/decoder_pred/kernel', 'decoder_pred.weight'), ('decoder/decoder_pred/bias', 'decoder_pred.bias')]
  return [('encoder/token_embed/embedding', 'token_emb.word_embeddings.weight', 'copy'),
          ('encoder/pos_embed', 'token_emb.position_embeddings.weight', 'embedding_table'),
          *_norm('encoder/embed_norm', 'token_emb.LayerNorm'),
          *_block('encoder/blocks_{i}', 'blocks.{i}'),
          *_norm('encoder/norm', 'norm'),
          *_linear('decoder/decoder_embed', 'decoder_embed'),
          ('decoder/decoder_pos_embed_learned', 'decoder_pos_embed_learned', 'copy'),
          *_block('decoder/decoder_blocks_{i}', 'decoder_blocks.{i}'),
          *_norm('decoder/decoder_norm', 'decoder_norm'),
          *_linear('decoder/mlm_layer/fc', 'mlm_layer.fc'),
          *_norm('decoder/mlm_layer/ln', 'mlm_layer.ln'),
          ('decoder/mlm_layer/bias', 'mlm_layer.bias', 'broadcast_bias'),
          *_vqgan('tokenizer', 'vqgan'),
          *[(jax, torch, UNUSED) for jax, torch in unused]]


def _clip_openai():
  """OpenAI CLIP's `VisionTransformer` (clip.load(jit=False).visual, open_clip's `visual`): the keys without the
  `visual.` prefix (`mae_jax.export.teachers` strips it). in_proj rows are [q | k | v], like our fused qkv;
  `proj` is (width, embed) and used as x @ proj, already a flax kernel."""
  block, torch = 'encoder/blocks_{i}', 'transformer.resblocks.{i}'
  return [('encoder/cls_token', 'class_embedding', 'token'),
          ('encoder/pos_embed', 'positional_embedding', 'embedding_table'),
          ('encoder/patch_embed/proj/kernel', 'conv1.weight', 'conv'),
          *_norm('encoder/norm_pre', 'ln_pre'),
          *_norm(f'{block}/norm1', f'{torch}.ln_1'),
          (f'{block}/attn/qkv/kernel', f'{torch}.attn.in_proj_weight', 'dense'),
          (f'{block}/attn/qkv/bias', f'{torch}.attn.in_proj_bias', 'copy'),
          *_linear(f'{block}/attn/proj', f'{torch}.attn.out_proj'),
          *_norm(f'{block}/norm2', f'{torch}.ln_2'),
          *_linear(f'{block}/mlp/fc1', f'{torch}.mlp.c_fc'),
          *_linear(f'{block}/mlp/fc2', f'{torch}.mlp.c_proj'),
          *_norm('encoder/norm', 'ln_post'),
          ('encoder/head/kernel', 'proj', 'copy')]


def _clip_hf():
  """HF transformers `CLIPVisionModel` / `CLIPModel` vision keys without the `vision_model.` prefix, with
  q/k/v fused into one `self_attn.qkv_proj` (`mae_jax.export.teachers` does both); `visual_projection`
  is `CLIPModel`'s (and `CLIPVisionModelWithProjection`'s)."""
  block, torch = 'encoder/blocks_{i}', 'encoder.layers.{i}'
  return [('encoder/cls_token', 'embeddings.class_embedding', 'token'),
          ('encoder/pos_embed', 'embeddings.position_embedding.weight', 'embedding_table'),
          ('encoder/patch_embed/proj/kernel', 'embeddings.patch_embedding.weight', 'conv'),
          *_norm('encoder/norm_pre', 'pre_layrnorm'),  # sic
          *_norm(f'{block}/norm1', f'{torch}.layer_norm1'),
          *_linear(f'{block}/attn/qkv', f'{torch}.self_attn.qkv_proj'),
          *_linear(f'{block}/attn/proj', f'{torch}.self_attn.out_proj'),
          *_norm(f'{block}/norm2', f'{torch}.layer_norm2'),
          *_linear(f'{block}/mlp/fc1', f'{torch}.mlp.fc1'),
          *_linear(f'{block}/mlp/fc2', f'{torch}.mlp.fc2'),
          *_norm('encoder/norm', 'post_layernorm'),
          ('encoder/head/kernel', 'visual_projection.weight', 'dense')]


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
    # MaskGIT's tokenizer as MAGE's taming port saves it (vqgan_jax_strongaug.ckpt: encoder.*, decoder.*,
    # quantize.embedding.weight), for the params of objective 'vqgan' (params['vqgan']).
    'vqgan': _vqgan('vqgan', ''),
    # MAGE's pretraining model. Export writes the vqgan.* keys when the params hold the frozen tokenizer (the
    # loop's params with the frozen networks: `Trainer.with_frozen`); import takes --ignore='vqgan.*' (the
    # tokenizer is imported on its own, --format=vqgan). MAGE-C's contrastive_head is not in the layout.
    'mage-official': _mage(),
    # The frozen teachers of MR-MAE / MaskAlign (`mae_jax.models.teachers`), imported with
    # `python -m mae_jax.export import --format=... --in=FILE --out=teacher.msgpack` (no --config: the shapes come
    # from the file). OpenAI CLIP / open_clip state dicts; HF CLIPVisionModel / CLIPModel model.safetensors;
    # timm `vit_base_patch16_clip_224.openai` (its zero `head.bias` is checked and dropped: our projection has
    # none); DINO's `dino_vitbase16_pretrain.pth` and timm's `vit_base_patch16_224.dino` (the same keys).
    'clip-openai': _clip_openai(),
    'clip-hf': _clip_hf(),
    'clip-timm': [(jax, torch, kind) for jax, torch, kind in _encoder('posemb') if 'patch_embed/proj/bias' not in jax]
                 + _norm('encoder/norm_pre', 'norm_pre') + [('encoder/head/kernel', 'head.weight', 'dense'),
                                                            ('encoder/head/bias', 'head.bias', UNUSED)],
    'dino': _encoder('posemb'),
    # Alpha-VL/ConvMAE `models_convmae.MaskedAutoencoderConvViT` (pretraining: the fusion convs, MAE's decoder;
    # fixed tables without a cls row in v1). The encoder-only files load with --allow_missing='decoder*,mask_token'.
    'convmae-official': _convvit('sincos') + _conv('encoder/stage1_output_decode', 'stage1_output_decode')
                        + _conv('encoder/stage2_output_decode', 'stage2_output_decode') + MAE_DECODER,
    # Its fine-tuning model, `models_convvit.ConvViT(global_pool=True)`: learned pos_embed, fc_norm (a pretrained
    # encoder's final norm becomes it, as for 'mae-finetuned'), head; no fusion convs.
    'convvit-finetuned': _convvit('posemb', norm='fc_norm') + _norm('encoder/fc_norm', 'fc_norm') + HEAD,
}
TEACHER_FORMATS = {'clip-openai': 'clip', 'clip-hf': 'clip', 'clip-timm': 'clip', 'dino': 'dino'}  # format: arch


def scope(fmt):
  """The top-level param modules a format covers; the rest of a params tree is not its business."""
  return {jax.split('/')[0] for jax, _, _ in FORMATS[fmt]}


def fixed_tables(objective):
  """The objective's fixed sin-cos tables (1, [1 +] L, D), keyed by the jax paths the rules use (a learned
  table is a param instead, exported and imported like one), and its `UNUSED` entries."""
  out = {}
  if getattr(getattr(objective, 'encoder', None), 'posemb', None) == 'sincos':  # a tokenizer has no ViT
    enc = objective.encoder
    out['encoder/pos_embed'] = posemb_sincos_2d(enc.width, enc.grid_size, enc.num_prefix_tokens > 0)[None]
  decoder = getattr(objective, 'decoder', None)
  if isinstance(decoder, MAEDecoder):  # MAE's fixed table; MAGE's decoder has a learned one
    out['decoder/decoder_pos_embed'] = posemb_sincos_2d(decoder.width, decoder.grid_size, decoder.cls_token)[None]
  if hasattr(objective, 'unused_reference_tensors'):
    out.update(objective.unused_reference_tensors())
  return out
