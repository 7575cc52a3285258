"""Mixup / CutMix as timm's `Mixup(mode='batch', correct_lam=True)` applies them, in jnp for the jitted train step.

MAE fine-tunes with `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
label_smoothing=0.1, num_classes)` (timm/data/mixup.py), per batch:
  with probability `prob` mix (else lam = 1 and the images are kept); with both alphas on, CutMix with
  probability `switch_prob`, else Mixup; lam ~ Beta(alpha, alpha) of the chosen one;
  Mixup   x = lam * x + (1 - lam) * x[::-1];
  CutMix  a box of (int(H sqrt(1 - lam)), int(W sqrt(1 - lam))) centred uniformly on a pixel, clipped to the
          image, is pasted from x[::-1]; lam becomes 1 - box area / image area;
  targets lam * smooth(y) + (1 - lam) * smooth(y[::-1]), smooth: off = s / classes, on = 1 - s + off.
Images are (N, H, W, C). The box is dynamic values, pasted through an iota mask, so shapes stay static and one
compilation serves every draw (the cut size is computed in float32, timm's in float64: they differ only
when H sqrt(1 - lam) is within ~1e-5 of an integer). `num_groups` > 1 mixes each of that many equal slices of
the batch on its own (own lam, own flip), as the reference does per GPU, each process mixing its local batch.
"""
import jax
import jax.numpy as jnp


def cutmix_box(lam, cy, cx, height, width):
  """((yl, yh, xl, xh) int32, corrected lam): timm's rand_bbox(lam) around the centre (cy, cx), clipped."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl, yh = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  xl, xh = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  box = jnp.stack([yl, yh, xl, xh]).astype(jnp.int32)
  return box, 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (height * width)


def sample_lambda(rng, *, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0):
  """(use_cutmix bool, lam float32) of one batch, before the CutMix box corrects lam (1 when not mixing)."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    raise ValueError('mixup: one of mixup_alpha, cutmix_alpha must be > 0')
  k_apply, k_switch, k_beta = jax.random.split(rng, 3)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < switch_prob
  else:
    use_cutmix = jnp.bool_(cutmix_alpha > 0)
  # one Beta draw at the chosen alpha: drawing both and picking one would double the (slow to compile) sampler
  alpha = jnp.where(use_cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
  lam = jax.random.beta(k_beta, alpha, alpha)
  apply = jax.random.uniform(k_apply) < prob
  return use_cutmix & apply, jnp.where(apply, lam, 1.0).astype(jnp.float32)


def sample_params(rng, image_shape, **kwargs):
  """(use_cutmix bool, lam float32, box int32 (yl, yh, xl, xh)) of one batch of `image_shape` (N, H, W, C);
  `kwargs`: sample_lambda's, whose draw is that of split(rng, 3)[0]. For CutMix lam is the corrected one; for
  Mixup (or no mixing) the box is empty."""
  height, width = image_shape[1], image_shape[2]
  k_lam, k_cy, k_cx = jax.random.split(rng, 3)
  use_cutmix, lam = sample_lambda(k_lam, **kwargs)
  cy = jax.random.randint(k_cy, (), 0, height)  # np.random.randint(0, H): a pixel row
  cx = jax.random.randint(k_cx, (), 0, width)
  box, cut_lam = cutmix_box(lam, cy, cx, height, width)
  return use_cutmix, jnp.where(use_cutmix, cut_lam, lam), jnp.where(use_cutmix, box, 0)


def mix_images(images, lam):
  """Mixup: lam * x + (1 - lam) * x[::-1] (timm's order of operations)."""
  lam = jnp.asarray(lam, images.dtype)
  return images * lam + images[::-1] * (1 - lam)


def box_mask(box, height, width):
  """(H, W, 1) bool: inside the half-open box (yl, yh, xl, xh)."""
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width, 1), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width, 1), 1)
  return (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])


def cut_images(images, box):
  """CutMix: the box of x[::-1] pasted into x."""
  return jnp.where(box_mask(box, images.shape[1], images.shape[2]), images[::-1], images)


def smooth_one_hot(labels, num_classes, smoothing):
  off = smoothing / num_classes
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), 1.0 - smoothing + off, off)


def mixed_targets(labels, lam, num_classes, smoothing):
  """(N, classes) float32: timm's mixup_target, lam * smooth(y) + (1 - lam) * smooth(y[::-1])."""
  y = smooth_one_hot(labels, num_classes, smoothing).astype(jnp.float32)
  lam = jnp.asarray(lam, jnp.float32)
  return y * lam + y[::-1] * (1 - lam)


def _mix(images, labels, rng, num_classes, label_smoothing, **kwargs):
  use_cutmix, lam, box = sample_params(rng, images.shape, **kwargs)
  mixed = jnp.where(use_cutmix, cut_images(images, box), mix_images(images, lam))
  return mixed, mixed_targets(labels, lam, num_classes, label_smoothing)


def mixup_cutmix(batch, rng, *, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1,
                 num_classes, num_groups=1):
  """`batch` with 'image' mixed and 'target' (N, classes) float32 soft targets (from batch['label'])."""
  kwargs = dict(num_classes=num_classes, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob)
  images, labels = batch['image'], batch['label']
  if num_groups == 1:
    mixed, targets = _mix(images, labels, rng, **kwargs)
  else:
    n = images.shape[0]
    if n % num_groups:
      raise ValueError(f'mixup: a batch of {n} does not split into {num_groups} groups')
    split = lambda a: a.reshape(num_groups, n // num_groups, *a.shape[1:])
    mixed, targets = jax.vmap(lambda x, y, r: _mix(x, y, r, **kwargs))(
        split(images), split(labels), jax.random.split(rng, num_groups))
    mixed, targets = mixed.reshape(images.shape), targets.reshape(n, num_classes)
  return {**batch, 'image': mixed, 'target': targets}


def soft_target_cross_entropy(logits, targets):
  """timm's SoftTargetCrossEntropy: mean over the batch of sum(-targets * log_softmax(logits))."""
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1).mean()


def label_smoothing_cross_entropy(logits, labels, smoothing):
  """timm's LabelSmoothingCrossEntropy: mean over the batch of (1 - s) * nll + s * mean(-log_softmax)."""
  logprobs = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logprobs, labels[:, None], axis=-1)[:, 0]
  return ((1.0 - smoothing) * nll - smoothing * logprobs.mean(-1)).mean()
