"""MAGE's iterative decoding (LTH14/mage `gen_img_uncond.py`, spec mage.md 1.8, 3 items 8-9, 7), editing, and the
sampler that the FID evaluator scores.

The loop, one jit-compiled `lax.fori_loop` over the steps t = 0..T-1, on (N, L) token ids:
  logits      the fake-class id in front, the full encoder and decoder: nothing is dropped at generation (the
              reference passes an all-zero `token_drop_mask`), the [MASK] positions padded by the decoder with
              the position-0 output; the first `codebook` logits, divided by the sampling temperature (1.0: the
              reference, which has none);
  sampled     a categorical draw at every position (by Gumbel-max over explicit noise); known tokens kept;
  confidence  log p(sampled) + choice_temperature * (1 - (t + 1) / T) * Gumbel noise, +inf at known tokens;
  re-masked   mask_len = floor(L0 * cos(pi / 2 * (t + 1) / T)) clamped to [1, unknown - 1], and every token with
              confidence <= the mask_len-th smallest (the reference's `<=`; MaskGIT's is `<` the next one).
The last step's `sampled` ids are the result, decoded by the VQGAN. L0 is the number of unknown tokens at the
start: all L in generation (the reference's 256), the masked ones when editing (MaskGIT's rule).

Two departures, both invisible where the reference is defined: mask_len is computed per image (the reference uses
row 0's count for the batch, spec 7 item 3; every row has the same count in unconditional generation), so an
image does not depend on its batch; and only unknown tokens can be re-masked (the reference's +inf confidence
does this unless nothing is unknown, where its clamp would re-mask everything).

Randomness is per image: image i draws its noise from fold_in(fold_in(key(seed), i), step), so the same seed gives
the same images on any mesh and at any batch size. `decode_step` takes the noise explicitly (the parity tests).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from mae_jax import objectives, sharding
from mae_jax.config import require
from mae_jax.evaluate import fid
from mae_jax.models import masking
from mae_jax.objectives.mage import MAGE

DEFAULTS = dict(num_iter=20, choice_temperature=6.0, temperature=1.0)  # the README's (the script's: 12 and 4.5)


def mask_len_table(num_iter, num_tokens):
  """(num_iter, num_tokens + 1) int32: floor(u * cos(pi / 2 * (t + 1) / num_iter)) for u unknown tokens at the start,
  in float64 as the reference's numpy computes it (float32 would move some floors)."""
  ratios = np.cos(math.pi / 2.0 * (np.arange(num_iter) + 1) / num_iter)
  return np.floor(np.arange(num_tokens + 1)[None] * ratios[:, None]).astype(np.int32)


def choice_temperatures(choice_temperature, num_iter):
  """choice_temperature * (1 - (t + 1) / T) for t = 0..T-1 (spec 7 item 1: 0 at the last step), float32."""
  return np.float32(choice_temperature * (1.0 - (np.arange(num_iter) + 1) / num_iter))


def token_logits(model, params, tokens, temperature=1.0):
  """(N, L, codebook) fp32 logits of every position of `tokens` (N, L) ([MASK] where unknown): the full encoder
  (no token dropped) and decoder, in inference mode."""
  _, logits = model.predict(params, tokens, tokens == model.mask_id)
  return logits[:, 1:, :model.codebook_size] / temperature


def decode_step(model, params, tokens, start_unknown, table, temperatures, step, sample_noise, choice_noise,
                temperature=1.0):
  """One step of the loop from `tokens` (N, L), with the noise given: `sample_noise` (N, L, codebook) and
  `choice_noise` (N, L) standard Gumbel draws; `start_unknown` (N,) L0; `table`, `temperatures`: `mask_len_table`
  and `choice_temperatures`; `step`: t (traced or not). Returns {'sampled' (N, L) ids, 'confidence' (N, L) fp32,
  'masking' (N, L) bool: re-masked, 'tokens': the next step's}."""
  logits = token_logits(model, params, tokens, temperature)
  unknown = tokens == model.mask_id
  sampled = jnp.where(unknown, jnp.argmax(logits + sample_noise, axis=-1), tokens)
  probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), sampled[..., None], axis=-1)[..., 0]
  confidence = jnp.where(unknown, jnp.log(probs), jnp.inf) + jnp.asarray(temperatures)[step] * choice_noise
  mask_len = jnp.maximum(1, jnp.minimum(unknown.sum(-1) - 1, jnp.asarray(table)[step, start_unknown]))
  cut = jnp.take_along_axis(jnp.sort(confidence, axis=-1), (mask_len - 1)[:, None], axis=-1)
  remask = unknown & (confidence <= cut)
  return {'sampled': sampled, 'confidence': confidence, 'masking': remask,
          'tokens': jnp.where(remask, model.mask_id, sampled)}


def step_noise(keys, step, num_tokens, codebook_size):
  """(sample noise (N, L, codebook), choice noise (N, L)) of `step` for images of `keys` (N,): each image's own."""
  def draw(key):
    sample_key, choice_key = jax.random.split(jax.random.fold_in(key, step))
    return (jax.random.gumbel(sample_key, (num_tokens, codebook_size), jnp.float32),
            jax.random.gumbel(choice_key, (num_tokens,), jnp.float32))
  return jax.vmap(draw)(keys)


def image_keys(seed, indices):
  """Image i's key, fold_in(key(seed), i), for the (N,) global image indices."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(indices)


def decode(model, params, tokens, keys, num_iter, choice_temperature, temperature=1.0):
  """The whole loop: `tokens` (N, L) with [MASK] at the unknown ones -> the last step's sampled ids (N, L)."""
  num_tokens = tokens.shape[1]
  table, temperatures = mask_len_table(num_iter, num_tokens), choice_temperatures(choice_temperature, num_iter)
  start_unknown = (tokens == model.mask_id).sum(-1)

  def body(step, carry):
    sample_noise, choice_noise = step_noise(keys, step, num_tokens, model.codebook_size)
    out = decode_step(model, params, carry[0], start_unknown, table, temperatures, step, sample_noise, choice_noise,
                      temperature)
    return out['tokens'], out['sampled']

  return jax.lax.fori_loop(0, num_iter, body, (tokens, tokens))[1]


def generate(model, params, keys, num_iter=20, choice_temperature=6.0, temperature=1.0):
  """Unconditional samples of images `keys` (N,), every token [MASK] at the start: ([0, 1] images (N, H, W, 3),
  their ids (N, L))."""
  tokens = jnp.full((keys.shape[0], model.num_tokens), model.mask_id, jnp.int32)
  ids = decode(model, params, tokens, keys, num_iter, choice_temperature, temperature)
  return model.decode_pixels(params['tokenizer'], ids), ids


# --------------------------------------------------------------------------------------------------- editing

def box_token_mask(box, img_size, patch, outpaint=False, border=1):
  """(L,) bool, the tokens to generate for a pixel box (x0, y0, x1, y1), x1 and y1 exclusive: inpainting masks every
  token the box touches plus a `border` of tokens around them (LTH14/mage#3: pixels 64-191 of 256 -> tokens 3-12);
  outpainting keeps the tokens inside the box less that border and masks the rest."""
  x0, y0, x1, y1 = box
  grid = img_size // patch
  start, stop = np.array([y0, x0]), np.array([y1, x1])
  if outpaint:  # the tokens wholly inside the box, less the border
    lo, hi = -(-start // patch) + border, stop // patch - border
  else:  # every token the box touches, and the border
    lo, hi = start // patch - border, -(-stop // patch) + border
  rows, cols = np.arange(grid)[:, None], np.arange(grid)[None]
  inside = (rows >= lo[0]) & (rows < hi[0]) & (cols >= lo[1]) & (cols < hi[1])
  return (~inside if outpaint else inside).reshape(-1)


def check_box(box, img_size):
  """ValueError unless (x0, y0, x1, y1) is a non-empty box within an image of `img_size` pixels."""
  if len(box) != 4 or not (0 <= box[0] < box[2] <= img_size and 0 <= box[1] < box[3] <= img_size):
    raise ValueError(f'box {",".join(map(str, box))} is not x0,y0,x1,y1 with 0 <= x0 < x1 <= {img_size} and '
                     f'0 <= y0 < y1 <= {img_size} (pixels of the {img_size}x{img_size} image; x1, y1 exclusive)')


def token_pixels(token_mask, patch):
  """(N, L) bool per token -> (N, H, W, 1) float per pixel."""
  side = round(token_mask.shape[1] ** 0.5)
  grid = token_mask.reshape(-1, side, side).astype(jnp.float32)
  return jnp.repeat(jnp.repeat(grid, patch, axis=1), patch, axis=2)[..., None]


def edit(model, params, pixels, masked, keys, num_iter, choice_temperature, temperature=1.0, blank=True):
  """Regenerates the `masked` (N, L) tokens of [0, 1] images `pixels` (N, H, W, 3) and keeps the others.

  With `blank`, the masked tokens' pixels are zeroed before tokenizing (the recipe of LTH14/mage#3), so what was
  there does not reach the kept tokens through the VQGAN encoder's receptive field. Returns {'input' (`pixels`),
  'mask' (the input, masked tokens grey), 'output' (the decoding), 'ids', 'known' (the kept tokens' ids, [MASK]
  elsewhere)}."""
  shown = token_pixels(masked, model.encoder.patch_size)
  seen = pixels * (1 - shown) if blank else pixels
  ids = model.tokenize(params['tokenizer'], seen)
  known = jnp.where(masked, model.mask_id, ids)
  out = decode(model, params, known, keys, num_iter, choice_temperature, temperature)
  return {'input': pixels, 'mask': seen * (1 - shown) + 0.5 * shown, 'output': model.decode_pixels(params['tokenizer'], out),
          'ids': out, 'known': known}


def random_token_mask(keys, num_tokens, mask_ratio):
  """(N, L) bool: ceil(L * mask_ratio) tokens per image by ranks of uniform noise from its key (reconstruction;
  give it keys other than the decoding's)."""
  noise = jax.vmap(lambda k: jax.random.uniform(k, (num_tokens,)))(keys)
  return masking.dynamic_mask(noise, math.ceil(num_tokens * mask_ratio)) > 0


# ------------------------------------------------------------------------------------------------- sharding

def jit_generate(model, mesh, **options):
  """generate, jitted once for the mesh: (params replicated, seed, indices sharded over the batch) -> (uint8 images
  as the reference's PNGs hold them, ids), replicated to every host."""
  def run(params, seed, indices):
    images, ids = generate(model, params, image_keys(seed, indices), **options)
    return fid.to_uint8(images), ids
  return jax.jit(run, in_shardings=(sharding.replicated(mesh),) * 2 + (sharding.batch_sharding(mesh),),
                 out_shardings=sharding.replicated(mesh))


def jit_edit(model, mesh, box, outpaint, mask_ratio, **options):
  """`edit` of one image, jitted once for the mesh: (params, seed, indices (B,) sharded over the batch, pixels
  (1, H, W, 3) in [0, 1]) -> uint8 {'input', 'mask', 'output'} (B, H, W, 3), variant i drawn from image i's key.
  `box`: the pixel box of in- or outpainting; None: reconstruction of `mask_ratio` of the tokens, at random."""
  def run(params, seed, indices, pixels):
    keys, n = image_keys(seed, indices), indices.shape[0]
    if box is None:
      pairs = jax.vmap(jax.random.split)(keys)  # the mask's keys apart from the decoding's
      masked, keys = random_token_mask(pairs[:, 0], model.num_tokens, mask_ratio), pairs[:, 1]
    else:
      masked = jnp.broadcast_to(box_token_mask(box, model.img_size, model.encoder.patch_size, outpaint),
                                (n, model.num_tokens))
    out = edit(model, params, jnp.broadcast_to(pixels, (n,) + pixels.shape[1:]), masked, keys, blank=box is not None,
               **options)
    return {name: fid.to_uint8(out[name]) for name in ('input', 'mask', 'output')}
  replicated = sharding.replicated(mesh)
  return jax.jit(run, in_shardings=(replicated, replicated, sharding.batch_sharding(mesh), replicated),
                 out_shardings=replicated)


class Sampler:
  """A MAGE with `generate(params, rng, n) -> (n, H, W, 3)` [0, 1] images (what `fid.FidEvaluator` scores): the
  loop with `options` (num_iter, choice_temperature, temperature); image j of the call draws from fold_in(rng, j)."""

  def __init__(self, model, **options):
    self.model, self.options = model, options

  def generate(self, params, rng, n):
    keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(jnp.arange(n))
    return generate(self.model, params, keys, **self.options)[0]


class FidEvaluator(fid.FidEvaluator):
  """FID and IS of MAGE's samples during pretraining ('fid' in config.eval.evaluators; off by default), against
  cached reference statistics: `fid.FidEvaluator` over `Sampler` with config.eval.fid's decoding options. It needs
  no eval split."""
  needs_eval_split = False

  @staticmethod
  def default_config():
    c = fid.FidEvaluator.default_config()
    c.update(DEFAULTS)  # the decoding: iterations, choice temperature (annealed), sampling temperature
    return c

  @staticmethod
  def validate(config, task):
    """What can be checked before anything is built (the files are read when the evaluator is)."""
    require(issubclass(objectives.OBJECTIVES[config.objective], MAGE),
            f"config.eval.evaluators: 'fid' is not an evaluator of task {task!r} with config.objective="
            f"{config.objective!r} (it scores MAGE's samples)")
    c = config.eval.fid
    require(c.num_iter >= 1 and c.temperature > 0 and c.choice_temperature >= 0,
            'config.eval.fid: num_iter >= 1, temperature > 0, choice_temperature >= 0')

  def __init__(self, config, model, train_source, eval_source, mesh):
    options = {name: config.eval.fid[name] for name in DEFAULTS}
    super().__init__(config, Sampler(model, **options), train_source, eval_source, mesh)
