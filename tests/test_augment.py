"""Fine-tuning and linear-probe augmentation against timm: RandAugment, random erasing, mixup/cutmix, the transforms.

timm draws from python `random`, `np.random` and torch; ours from one NumPy Generator (or a JAX key). The
equality tests drive timm with stand-ins for its random modules that draw from a Generator in timm's order,
so both sides see the same numbers; the distribution tests check the draws themselves.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

from mae_jax import config as config_lib
from mae_jax.data import mixup, randaugment, transforms

timm_data = pytest.importorskip('timm.data')
torch = pytest.importorskip('torch')
stats = pytest.importorskip('scipy.stats')
from timm.data import auto_augment, random_erasing  # noqa: E402  (after the skip)
from timm.data import mixup as timm_mixup  # noqa: E402
from timm.data import transforms as timm_transforms  # noqa: E402

MAE_AA = 'rand-m9-mstd0.5-inc1'
ALL_OPS = sorted(set(randaugment.OPS) | set(randaugment.INCREASING_OPS))


def image(seed, height=24, width=32):
  """A uint8 RGB image with structure (gradients) and noise, so every op changes it."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:height, :width]
  base = np.stack([yy * 200 / height, xx * 200 / width, (yy + xx) * 100 / (height + width)], -1)
  return Image.fromarray(np.clip(base + rng.integers(0, 56, (height, width, 3)), 0, 255).astype(np.uint8))


def drawn_like_timm(gen):
  """Stand-ins for timm's `random` and `np.random` that draw from `gen` as our code does."""
  rand = types.SimpleNamespace(
      random=gen.random, uniform=gen.uniform, gauss=gen.normal,
      randint=lambda a, b: int(gen.integers(a, b + 1)))  # python's randint includes b
  # np.random.choice(ops, n, replace=True, p=None): uniform indices, as RandAugment.sample draws them
  np_random = types.SimpleNamespace(choice=lambda a, size, replace, p: [a[i] for i in gen.integers(0, len(a), size)])
  return rand, types.SimpleNamespace(random=np_random)


@pytest.fixture(autouse=True)
def posterize_to_zero_bits(monkeypatch):
  """timm's posterize to 0 bits (PosterizeIncreasing at magnitude 10: 2.3% of MAE's draws of it) masked every
  bit away in older Pillow, a black image; Pillow 13 raises (timm then fails on ~0.2% of images). timm here
  sees the old rule, which ours keeps."""
  def posterize(img, bits):
    if bits == 0:
      return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)
  monkeypatch.setattr(auto_augment, 'ImageOps', types.SimpleNamespace(**{**vars(ImageOps), 'posterize': posterize}))


def timm_finetune_transform(size, re_prob, re_mode='pixel'):
  return timm_data.create_transform(size, is_training=True, auto_augment=MAE_AA, interpolation='bicubic',
                                    re_prob=re_prob, re_mode=re_mode, re_count=1, mean=config_lib.IMAGENET_MEAN,
                                    std=config_lib.IMAGENET_STD)


def timm_randaugment(transform):
  (ra,) = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)]
  return ra


# ------------------------------------------------------------------------------------------ RandAugment

def test_mae_string_builds_timms_randaugment():
  ours = randaugment.from_timm_string(MAE_AA, config_lib.IMAGENET_MEAN, 'bicubic')
  theirs = timm_randaugment(timm_finetune_transform(224, 0.25))
  assert [op.name for op in theirs.ops] == list(ours.ops) == list(auto_augment._RAND_INCREASING_TRANSFORMS)
  assert theirs.num_layers == ours.num_layers == 2 and theirs.choice_weights is None
  for op in theirs.ops:
    assert (op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) == (0.5, 9, 0.5, None)
    assert op.kwargs['fillcolor'] == ours.fill == (124, 116, 104)
    assert op.kwargs['resample'] == ours.resample == Image.BICUBIC
  assert (ours.prob, ours.magnitude, ours.magnitude_std, ours.magnitude_max) == (0.5, 9, 0.5, 10.0)
  plain = randaugment.from_timm_string('rand-m7-n3-mstd0-p0.8-mmax20')
  assert plain.ops == tuple(auto_augment._RAND_TRANSFORMS)
  assert (plain.num_layers, plain.magnitude, plain.magnitude_std, plain.prob, plain.magnitude_max) == (3, 7, 0, 0.8, 20)
  assert randaugment.from_timm_string('rand-mstd101').magnitude_std == float('inf')  # timm: > 100 is uniform
  for bad in ('rand-m9-tweights', 'augmix-m5', 'rand-x3', 'rand-m'):
    with pytest.raises(ValueError):
      randaugment.from_timm_string(bad)


@pytest.mark.parametrize('name', ALL_OPS)
def test_each_op_equals_timms(name, monkeypatch):
  """Each op at fixed magnitudes and signs, with the hparams timm's create_transform passes for MAE."""
  hparams = dict(translate_const=int(224 * 0.45), img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
  img = image(ALL_OPS.index(name))
  changed = False
  for magnitude in (0, 2.5, 4.5, 7.3, 9, 10):
    theirs_op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)
    for sign in (1, -1):
      monkeypatch.setattr(auto_augment, 'random', types.SimpleNamespace(random=lambda: 0.9 if sign < 0 else 0.1))
      theirs = np.asarray(theirs_op(img))
      ours = np.asarray(randaugment.apply_op(name, img, magnitude, sign))
      assert ours.dtype == np.uint8 and ours.shape == theirs.shape
      np.testing.assert_array_equal(ours, theirs, err_msg=f'{name} m={magnitude} sign={sign}')
      changed |= not np.array_equal(ours, np.asarray(img))
  assert changed, f'{name} never changed the test image'


@pytest.mark.parametrize('config_str', [MAE_AA, 'rand-m7-n3-mstd1.5-p0.8', 'rand-m9-mstd101-inc1'])
def test_randaugment_equals_timms_given_the_same_draws(config_str, monkeypatch):
  """The whole op choice, skip, magnitude noise, clip and sign logic: timm fed our Generator's numbers."""
  hparams = dict(translate_const=int(224 * 0.45), img_mean=(124, 116, 104), interpolation=Image.BICUBIC)
  theirs = auto_augment.rand_augment_transform(config_str, dict(hparams))
  ours = randaugment.from_timm_string(config_str)
  img = image(1)
  for seed in range(150):
    rand, fake_np = drawn_like_timm(np.random.default_rng(seed))
    monkeypatch.setattr(auto_augment, 'random', rand)
    monkeypatch.setattr(auto_augment, 'np', fake_np)
    expected = np.asarray(theirs(img))
    np.testing.assert_array_equal(np.asarray(ours(img, np.random.default_rng(seed))), expected, err_msg=str(seed))


def test_randaugment_sampling_statistics():
  ours = randaugment.from_timm_string(MAE_AA)
  rng = np.random.default_rng(0)
  draws = [ours.sample(rng) for _ in range(20000)]
  # each of the 2 layers applied with probability 0.5: Binomial(2, 0.5) ops per image
  counts = np.bincount([len(d) for d in draws], minlength=3)
  assert stats.chisquare(counts, 20000 * np.array([0.25, 0.5, 0.25])).pvalue > 1e-3
  # ops uniform over the 15, with replacement (two applied ops are the same one 1/15 of the time)
  applied = [name for d in draws for name, _, _ in d]
  frequency = np.array([applied.count(name) for name in ours.ops])
  assert stats.chisquare(frequency).pvalue > 1e-3
  pairs = [d for d in draws if len(d) == 2]
  same = np.mean([a[0] == b[0] for a, b in pairs])
  assert abs(same - 1 / 15) < 4 * np.sqrt(1 / 15 * 14 / 15 / len(pairs))
  # magnitudes N(9, 0.5) clipped to [0, 10]: 2.28% sit at 10, the rest are the normal below it
  magnitudes = np.array([m for d in draws for _, m, _ in d])
  clipped = np.mean(magnitudes == 10.0)
  assert abs(clipped - stats.norm.sf(2.0)) < 4 * np.sqrt(0.0228 * 0.9772 / len(magnitudes))
  below = magnitudes[magnitudes < 10.0]
  assert stats.kstest(below, stats.truncnorm(-np.inf, 2.0, loc=9, scale=0.5).cdf).pvalue > 0.01
  # the sign: negative half the time, only for the signed ops
  signs = np.array([s for d in draws for name, _, s in d if randaugment.is_signed(name)])
  assert abs(np.mean(signs < 0) - 0.5) < 4 * np.sqrt(0.25 / len(signs))
  assert all(s == 1 for d in draws for name, _, s in d if not randaugment.is_signed(name))
  # mstd > 100: magnitude uniform in [0, m]
  uniform = randaugment.from_timm_string('rand-m9-mstd101-inc1')
  magnitudes = np.array([m for _ in range(3000) for _, m, _ in uniform.sample(rng)])
  assert stats.kstest(magnitudes, stats.uniform(0, 9).cdf).pvalue > 0.01


# ------------------------------------------------------------------------------------------ random erasing

@pytest.mark.parametrize('probability,max_count', [(1.0, 1), (0.25, 1), (1.0, 3)])
def test_random_erasing_boxes_equal_timms_given_the_same_draws(probability, max_count, monkeypatch):
  """In 'const' mode (zeros, no noise) the erased region is the box alone: timm's equals ours, seed by seed."""
  theirs = random_erasing.RandomErasing(probability, mode='const', max_count=max_count, device='cpu')
  ours = randaugment.RandomErasing(probability, mode='const', max_count=max_count)
  erased = 0
  for seed in range(200):
    rand, _ = drawn_like_timm(np.random.default_rng(seed))
    monkeypatch.setattr(random_erasing, 'random', rand)
    expected = theirs(torch.ones(3, 40, 56)).numpy().transpose(1, 2, 0)
    got = ours(np.ones((40, 56, 3), np.float32), np.random.default_rng(seed))
    np.testing.assert_array_equal(got, expected, err_msg=str(seed))
    erased += int((got == 0).any())
  assert erased > (100 if probability == 1.0 else 20)


def test_random_erasing_follows_the_rules_of_the_spec():
  height, width = 64, 80
  area = height * width
  erasing = randaugment.RandomErasing(1.0, mode='pixel')
  rng = np.random.default_rng(0)
  values = []
  for _ in range(500):
    out = erasing(np.zeros((height, width, 3), np.float32), rng)
    rows, cols = np.nonzero(out.any(-1))
    top, left = rows.min(), cols.min()
    h, w = rows.max() - top + 1, cols.max() - left + 1
    box = out[top:top + h, left:left + w]
    assert (box != 0).all() and np.count_nonzero(out.any(-1)) == h * w  # one full rectangle
    assert h < height and w < width
    # h = round(sqrt(T a)), w = round(sqrt(T / a)) for some area T in [0.02, 1/3] * area, aspect a in [0.3, 1/0.3]
    assert (h + 0.5) * (w + 0.5) >= 0.02 * area and (h - 0.5) * (w - 0.5) <= area / 3
    assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
    values.append(box.ravel())
  values = np.concatenate(values)
  assert values.dtype == np.float32 and abs(values.mean()) < 0.01 and abs(values.std() - 1) < 0.01
  assert stats.kstest(values[:20000], 'norm').pvalue > 0.01
  # probability 0.25; the same Generator state gives the same erasing
  mae = randaugment.RandomErasing(0.25, mode='pixel')
  hits = np.mean([bool(mae(np.zeros((32, 32, 3), np.float32), rng).any()) for _ in range(4000)])
  assert abs(hits - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
  a, b = (mae(np.zeros((32, 32, 3), np.float32), np.random.default_rng(7)) for _ in range(2))
  np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------ mixup / cutmix

def batch(n=6, height=12, width=10, num_classes=7, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, height, width, 3)).astype(np.float32),
          rng.integers(0, num_classes, n).astype(np.int32))


def timm_mix(images, labels, monkeypatch, *, lam, use_cutmix, centre=(0, 0), num_classes=7, smoothing=0.1):
  """timm's Mixup(0.8, 1.0, mode='batch') with its draws fixed: (images NHWC, targets, lam)."""
  draws = iter([0.0, 0.1 if use_cutmix else 0.9])  # mix (< prob 1.0), then cutmix if < switch_prob 0.5
  monkeypatch.setattr(timm_mixup.np.random, 'rand', lambda *size: next(draws))
  monkeypatch.setattr(timm_mixup.np.random, 'beta', lambda a, b: lam)
  position = iter(centre)
  monkeypatch.setattr(timm_mixup.np.random, 'randint', lambda low, high, size=None: next(position))
  fn = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode='batch',
                        label_smoothing=smoothing, num_classes=num_classes)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  x, target = fn(x, torch.from_numpy(labels).long())
  return x.numpy().transpose(0, 2, 3, 1), target.numpy()


@pytest.mark.parametrize('lam', [0.0625, 0.3, 0.71875, 0.99])
def test_mixup_with_a_fixed_lambda_equals_timms(lam, monkeypatch):
  images, labels = batch()
  expected_images, expected_targets = timm_mix(images, labels, monkeypatch, lam=lam, use_cutmix=False)
  np.testing.assert_allclose(mixup.mix_images(jnp.asarray(images), lam), expected_images, atol=1e-6, rtol=0)
  np.testing.assert_allclose(mixup.mixed_targets(jnp.asarray(labels), lam, 7, 0.1), expected_targets, atol=1e-7)


@pytest.mark.parametrize('lam,centre', [(0.3, (5, 4)), (0.05, (0, 9)), (0.8, (11, 0)), (0.5, (6, 5)),
                                        (0.999, (3, 3)), (0.0, (2, 7))])
def test_cutmix_with_a_fixed_lambda_and_centre_equals_timms(lam, centre, monkeypatch):
  images, labels = batch()
  height, width = images.shape[1:3]
  position = iter(centre)
  monkeypatch.setattr(timm_mixup.np.random, 'randint', lambda low, high, size=None: next(position))
  expected_box = timm_mixup.rand_bbox((height, width), lam)
  expected_images, expected_targets = timm_mix(images, labels, monkeypatch, lam=lam, use_cutmix=True, centre=centre)
  box, corrected = mixup.cutmix_box(jnp.float32(lam), centre[0], centre[1], height, width)
  assert tuple(int(v) for v in box) == tuple(int(v) for v in expected_box)
  yl, yh, xl, xh = expected_box
  assert float(corrected) == pytest.approx(1 - (yh - yl) * (xh - xl) / (height * width), abs=1e-7)
  np.testing.assert_array_equal(mixup.cut_images(jnp.asarray(images), box), expected_images)
  np.testing.assert_allclose(mixup.mixed_targets(jnp.asarray(labels), corrected, 7, 0.1), expected_targets,
                             atol=1e-7)


def test_losses_equal_timms():
  from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
  rng = np.random.default_rng(3)
  logits = rng.standard_normal((8, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, 8)
  for smoothing in (0.0, 0.1, 0.3):
    expected = LabelSmoothingCrossEntropy(smoothing)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    got = mixup.label_smoothing_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    for lam in (1.0, 0.37):
      targets = timm_mixup.mixup_target(torch.from_numpy(labels), 11, lam, smoothing)
      ours = mixup.mixed_targets(jnp.asarray(labels), lam, 11, smoothing)
      np.testing.assert_allclose(ours, targets.numpy(), atol=1e-7)
      expected = SoftTargetCrossEntropy()(torch.from_numpy(logits), targets).item()
      assert float(mixup.soft_target_cross_entropy(jnp.asarray(logits), ours)) == pytest.approx(expected, rel=1e-6)


SHAPE = (8, 12, 10, 3)


@pytest.fixture(scope='module', name='draws')
def draws_fixture():
  """sample_lambda and sample_params of the same keys (the first two: key(5)'s split in two), at prob 1 and 0.4.
  The gamma sampler behind Beta is slow to compile on CPU: one compilation serves every mixup test."""
  keys = jnp.concatenate([jax.random.split(jax.random.key(5), 2), jax.random.split(jax.random.key(0), 6000)])
  both = jax.jit(jax.vmap(lambda k, p: (mixup.sample_lambda(jax.random.split(k, 3)[0], prob=p),
                                       mixup.sample_params(k, SHAPE, prob=p)), in_axes=(0, None)))
  return keys, {prob: jax.tree.map(np.asarray, both(keys, prob)) for prob in (1.0, 0.4)}


def test_lambda_and_switch_distributions(draws):
  _, by_prob = draws
  (use_cutmix, lam), (box_cutmix, box_lam, box) = by_prob[1.0]
  assert abs(use_cutmix.mean() - 0.5) < 4 * np.sqrt(0.25 / len(lam))  # switch_prob
  assert stats.kstest(lam[use_cutmix], stats.beta(1.0, 1.0).cdf).pvalue > 0.01
  assert stats.kstest(lam[~use_cutmix], stats.beta(0.8, 0.8).cdf).pvalue > 0.01
  # the box: CutMix's lam is 1 - its area fraction; it reaches every border; Mixup keeps lam and has no box
  np.testing.assert_array_equal(box_cutmix, use_cutmix)
  np.testing.assert_array_equal(box_lam[~use_cutmix], lam[~use_cutmix])
  yl, yh, xl, xh = box.T
  area = SHAPE[1] * SHAPE[2]
  np.testing.assert_allclose(box_lam[use_cutmix], (1 - (yh - yl) * (xh - xl) / area)[use_cutmix], atol=1e-6)
  assert (box[~use_cutmix] == 0).all() and (yl <= yh).all() and (xl <= xh).all()
  assert (yl.min(), yh.max(), xl.min(), xh.max()) == (0, SHAPE[1], 0, SHAPE[2])
  # prob 0.4: no mixing (lam 1, no cutmix) the rest of the time
  (use_cutmix, lam), _ = by_prob[0.4]
  assert abs(np.mean(lam < 1) - 0.4) < 4 * np.sqrt(0.24 / len(lam)) and not use_cutmix[lam == 1].any()


def test_mixup_cutmix_compiles_once_and_mixes_each_group_on_its_own(draws):
  keys, by_prob = draws
  _, (use_cutmix, lam, box) = by_prob[1.0]
  images, labels = batch(n=SHAPE[0])
  data = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  traces = []

  def step(batch, rng):
    traces.append(1)
    return mixup.mixup_cutmix(batch, rng, num_classes=7)

  step = jax.jit(step)
  for i in range(2, 14):
    out = step(data, keys[i])
    assert out['image'].shape == images.shape and out['target'].shape == (8, 7)
    np.testing.assert_array_equal(out['label'], labels)
    expected = mixup.cut_images(images, box[i]) if use_cutmix[i] else mixup.mix_images(images, lam[i])
    np.testing.assert_allclose(out['image'], expected, atol=1e-6)
    np.testing.assert_allclose(out['target'], mixup.mixed_targets(labels, lam[i], 7, 0.1), atol=1e-7)
  assert len(traces) == 1 and set(use_cutmix[2:14]) == {True, False}
  # num_groups=2: each half mixed within itself, with the params of key(5)'s split (they depend on H, W only)
  grouped = jax.jit(lambda b, r: mixup.mixup_cutmix(b, r, num_classes=7, num_groups=2))(data, jax.random.key(5))
  for g in range(2):
    half = images[4 * g:4 * g + 4]
    expected = mixup.cut_images(half, box[g]) if use_cutmix[g] else mixup.mix_images(half, lam[g])
    np.testing.assert_allclose(grouped['image'][4 * g:4 * g + 4], expected, atol=1e-6)
    np.testing.assert_allclose(grouped['target'][4 * g:4 * g + 4],
                               mixup.mixed_targets(labels[4 * g:4 * g + 4], lam[g], 7, 0.1), atol=1e-7)


# ------------------------------------------------------------------------------------------ the transforms

def data_config(size=32):
  c = config_lib.base_config().data
  c.img_size = size
  return c


def test_finetune_transform_equals_timms_create_transform_given_the_same_draws(monkeypatch):
  """timm's whole fine-tuning pipeline (crop, flip, RandAugment, normalise, erasing in 'const' mode) fed our
  Generator's numbers in its order gives our FinetuneTransform's output."""
  size = 32
  theirs = timm_finetune_transform(size, re_prob=0.5, re_mode='const')
  ours = transforms.FinetuneTransform(data_config(size), reprob=0.5, remode='const')
  img = image(4, 45, 60)
  for seed in range(40):
    gen = np.random.default_rng(seed)
    rand, fake_np = drawn_like_timm(gen)
    for module in (timm_transforms, random_erasing, auto_augment):
      monkeypatch.setattr(module, 'random', rand)
    monkeypatch.setattr(auto_augment, 'np', fake_np)
    # torchvision's RandomHorizontalFlip draws torch.rand(1) < 0.5: the same rule from the Generator
    steps = [(lambda im: im.transpose(Image.FLIP_LEFT_RIGHT) if gen.random() < 0.5 else im)
             if type(t).__name__ == 'RandomHorizontalFlip' else t for t in theirs.transforms]
    expected = img
    for t in steps:
      expected = t(expected)
    got = ours(img, np.random.default_rng(seed))
    np.testing.assert_allclose(got, expected.numpy().transpose(1, 2, 0), atol=2e-5, err_msg=str(seed))


@pytest.mark.parametrize('kind', ['finetune', 'linprobe'])
def test_transforms_are_deterministic_per_generator(kind):
  size = 32
  make = transforms.FinetuneTransform if kind == 'finetune' else transforms.LinprobeTransform
  transform = make(data_config(size))
  img = image(5, 50, 40)
  first = transform(img, np.random.default_rng(0))
  assert first.shape == (size, size, 3) and first.dtype == np.float32
  out = np.empty((size, size, 3), np.float32)
  assert transform(img, np.random.default_rng(0), out=out) is out
  np.testing.assert_array_equal(out, first)
  others = [transform(img, np.random.default_rng(seed)) for seed in range(1, 6)]
  assert all(not np.array_equal(first, other) for other in others)


def test_linprobe_crop_is_one_draw_clamped_to_the_image():
  # scale 1, ratio 1 on a 100 x 400 image: a 200 x 200 window, clamped to 100 x 200 (torchvision would retry
  # ten times and then fall back to a centre crop); the column is uniform over the 201 places
  boxes = [transforms.single_sample_crop_box(np.random.default_rng(s), 100, 400, (1, 1), (1, 1)) for s in range(400)]
  assert {(top, h, w) for top, _, h, w in boxes} == {(0, 100, 200)}
  assert stats.kstest([left for _, left, _, _ in boxes], stats.randint(0, 201).cdf).pvalue > 0.01
  # unclamped draws: area fraction U(scale), log aspect U(log ratio)
  fractions, aspects = [], []
  for seed in range(2000):
    top, left, h, w = transforms.single_sample_crop_box(np.random.default_rng(seed), 1000, 1000, (0.08, 1.0),
                                                        (3 / 4, 4 / 3))
    assert 0 <= top <= 1000 - h and 0 <= left <= 1000 - w
    fractions.append(h * w / 1e6)
    aspects.append(np.log(w / h))
  assert abs(np.mean(fractions) - 0.54) < 0.02
  assert abs(np.mean(aspects)) < 0.01 and max(np.abs(aspects)) < np.log(4 / 3) + 0.02
