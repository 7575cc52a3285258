"""FID / IS (issue 14, must-shows 2 and 3): the Fréchet and IS math against closed forms and scipy, the TF1
resize and the Inception against torch-fidelity's own functions and module, the command against
`torch_fidelity.calculate_metrics`, prepare-reference against torchvision, and the evaluator.

No real Inception weights are needed: a random network (non-trivial BatchNorm statistics) is written in the
standard key layout, and torch-fidelity is always given that file (`feature_extractor_weights_path`), so it never
downloads anything.
"""
import os

import jax
import ml_collections
import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from conftest import run_cli
from mae_jax import sharding
from mae_jax.config import ConfigError
from mae_jax.evaluate import fid
from mae_jax.models import inception

NUM_GENERATED, NUM_REFERENCE, ISC_SPLITS = 6, 4, 2  # tiny folders: the Inception takes ~0.5 s per image on a CPU


def _random_spd(rng, d):
  x = rng.normal(size=(2 * d, d))
  return x.T @ x / (2 * d) + 0.1 * np.eye(d)


def _closed_form_fid(mu1, s1, mu2, s2):
  """The Fréchet distance with tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), a symmetric PSD matrix (eigh)."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(w)) @ v.T
  inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None)))


# ------------------------------------------------------------------------------------------- FID / IS math

@pytest.mark.parametrize('trace', fid.TRACES)
def test_fid_of_diagonal_gaussians_is_the_closed_form(trace):
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  v1, v2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2), trace) == pytest.approx(expected, rel=1e-10)


def test_fid_on_random_spd_matrices_matches_scipy_sqrtm_both_ways():
  rng = np.random.default_rng(1)
  for d in (2, 8, 64):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    scipy_fid = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real
    assert _closed_form_fid(mu1, s1, mu2, s2) == pytest.approx(scipy_fid, rel=1e-9)
    for trace in fid.TRACES:
      assert fid.frechet_distance(mu1, s1, mu2, s2, trace) == pytest.approx(scipy_fid, rel=1e-9), (d, trace)


@pytest.mark.parametrize('trace', fid.TRACES)
def test_fid_of_a_set_with_itself_is_zero(trace):
  features = np.random.default_rng(2).normal(size=(300, 32)).astype(np.float32)
  stats = fid.statistics(features)
  assert abs(fid.fid_from_statistics(stats, stats, trace)) < 1e-8
  assert stats['count'] == 300 and stats['sigma'].dtype == np.float64


def test_inception_score_of_uniform_and_of_k_confident_classes():
  mean, std = fid.inception_score(np.zeros((100, inception.NUM_CLASSES), np.float32))
  assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
  for k in (1, 5, 37):
    labels = np.tile(np.arange(k), 10 * 3)  # every split holds each of the k classes 3 times
    logits = 60.0 * np.eye(inception.NUM_CLASSES)[labels]
    mean, std = fid.inception_score(logits, splits=10, shuffle=False)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_metrics_match_torch_fidelity_functions():
  torch = pytest.importorskip('torch')
  metric_isc = pytest.importorskip('torch_fidelity.metric_isc')
  metric_fid = pytest.importorskip('torch_fidelity.metric_fid')
  rng = np.random.default_rng(3)
  logits = rng.normal(scale=3, size=(57, inception.NUM_CLASSES)).astype(np.float32)
  theirs = metric_isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
  mean, std = fid.inception_score(logits)
  assert mean == pytest.approx(theirs['inception_score_mean'], rel=1e-12)
  assert std == pytest.approx(theirs['inception_score_std'], rel=1e-9)
  a, b = rng.normal(size=(80, 24)).astype(np.float32), rng.normal(1, 2, size=(90, 24)).astype(np.float32)
  stats = [metric_fid.fid_features_to_statistics(torch.from_numpy(x)) for x in (a, b)]
  theirs = metric_fid.fid_statistics_to_metric(*stats, verbose=False)['frechet_inception_distance']  # eigvals (0.4.0)
  ours = fid.fid_from_statistics(fid.statistics(a), fid.statistics(b), 'eigvals')
  assert ours == pytest.approx(theirs, rel=1e-6)


def test_bad_inputs_are_named():
  with pytest.raises(fid.FidError, match='split 10 ways'):
    fid.inception_score(np.zeros((9, 5)))
  with pytest.raises(fid.FidError, match='at least 2'):
    fid.statistics(np.zeros((1, 5)))
  with pytest.raises(fid.FidError, match='trace'):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), 'svd')


# ------------------------------------------------------------------------------------------- preprocessing

def test_tf1_resize_hand_computed_cases():
  row = lambda values: np.asarray(values, np.float32)[None, None, :, None]
  resize = lambda x, size: fid.resize_bilinear_tf1(x, size)[0, ..., 0]
  np.testing.assert_allclose(resize(row([0, 3]), (1, 3)), [[0, 2, 3]], rtol=1e-6)  # src 0, 2/3, 4/3 -> clamped
  np.testing.assert_allclose(resize(row([0, 3, 6, 9]), (1, 6)), [[0, 2, 4, 6, 8, 9]], rtol=1e-6)
  np.testing.assert_array_equal(resize(row([0, 3, 6, 9]), (1, 2)), [[0, 6]])  # src 0, 2: no averaging
  square = np.asarray([[0, 1], [2, 3]], np.float32)[None, :, :, None]
  np.testing.assert_allclose(resize(square, (3, 3)), [[0, 2 / 3, 1], [4 / 3, 2, 7 / 3], [2, 8 / 3, 3]], rtol=1e-6)
  image = np.random.default_rng(4).integers(0, 256, (1, 7, 9, 3)).astype(np.float32)
  np.testing.assert_array_equal(fid.resize_bilinear_tf1(image, (7, 9)), image)  # same size: the identity


def test_tf1_resize_matches_torch_fidelity():
  torch = pytest.importorskip('torch')
  compat = pytest.importorskip('torch_fidelity.interpolate_compat_tensorflow')
  rng = np.random.default_rng(5)
  preprocess = jax.jit(fid.preprocess)
  for shape in ((2, 37, 53, 3), (1, 256, 256, 3), (1, 300, 200, 3)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2)
    theirs = compat.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    # Evaluated op by op (NumPy), the same float32 roundings: bit-identical.
    np.testing.assert_array_equal(fid.resize_bilinear_tf1(images.astype(np.float32), (299, 299)), theirs)
    # Compiled, XLA fuses the lerps into FMAs (one rounding instead of two): a few ulps of 255 apart; the
    # network's input, (x - 128) / 128, within 1e-5.
    np.testing.assert_allclose(np.asarray(preprocess(images)), (theirs - 128) / 128, rtol=0, atol=1e-5)


def test_to_uint8_truncates_as_the_reference():
  x = np.asarray([-0.1, 0.0, 0.5, 0.99999, 1.0, 1.2, 100.4 / 255], np.float32)
  np.testing.assert_array_equal(np.asarray(fid.to_uint8(x)), np.clip(x * 255, 0, 255).astype(np.uint8))
  assert fid.to_uint8(np.float32(0.5)) == 127  # 127.5 truncated, not rounded


# --------------------------------------------------------------------------------------- network and weights

@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'random_inception.pth')
  inception.save_torch(inception.random_variables(seed=0), path)
  return path


def test_key_table_covers_the_standard_layout():
  table = inception.torch_key_table()
  keys = {key for key, _ in table.values()}
  assert len(keys) == len(table) == 94 * 5 + 2  # 94 conv+BN (weight, 4 BN tensors) and the fc
  assert {'Conv2d_1a_3x3.conv.weight', 'Mixed_7c.branch_pool.bn.running_var', 'fc.weight', 'fc.bias',
          'Mixed_6b.branch7x7dbl_5.conv.weight'} <= keys
  assert table['params', 'Mixed_6b', 'branch7x7_2', 'conv', 'kernel'] == ('Mixed_6b.branch7x7_2.conv.weight',
                                                                          (1, 7, 128, 128))


def test_weights_round_trip_and_refusals(weights_file, tmp_path):
  torch = pytest.importorskip('torch')
  variables, digest = inception.load_weights(weights_file)
  expected = inception.random_variables(seed=0)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  assert 'sha256' in inception.hash_note(weights_file, digest) and len(digest) == 64
  named = tmp_path / f'weights-inception-2015-12-05-{digest[:8]}.pth'
  named.write_bytes(open(weights_file, 'rb').read())
  assert 'matches' in inception.hash_note(str(named), digest)
  assert inception.hash_note(inception.WEIGHTS_FILE, digest).startswith('WARNING')  # not the standard file's hash
  with pytest.raises(inception.InceptionWeightsError, match='pytorch-fid/releases'):
    inception.load_weights(str(tmp_path / 'absent.pth'))
  torch.save({'conv.weight': torch.zeros(3)}, tmp_path / 'other.pth')
  with pytest.raises(inception.InceptionWeightsError, match='not the FID Inception-v3 state_dict'):
    inception.load_weights(str(tmp_path / 'other.pth'))
  state = {k: torch.from_numpy(v) for k, v in inception.state_dict_from_variables(expected).items()}
  state['fc.weight'] = state['fc.weight'][:1000]
  torch.save(state, tmp_path / 'wrong_shape.pth')
  with pytest.raises(inception.InceptionWeightsError, match=r'fc.weight is float32 \(1000, 2048\), expected'):
    inception.load_weights(str(tmp_path / 'wrong_shape.pth'))


def test_inception_matches_torch_fidelity(weights_file):
  """The exported random network loads strictly into torch-fidelity's FeatureExtractorInceptionV3 and gives the
  same 2048-d features and unbiased logits on uint8 images (its own resize and normalisation included)."""
  torch = pytest.importorskip('torch')
  extractor_module = pytest.importorskip('torch_fidelity.feature_extractor_inceptionv3')
  theirs_net = extractor_module.FeatureExtractorInceptionV3(  # load_state_dict(strict=True) inside
      'inception-v3-compat', ['2048', 'logits_unbiased'], feature_extractor_weights_path=weights_file)
  images = np.random.default_rng(6).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
  with torch.no_grad():
    pool_t, logits_t = theirs_net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
  variables, _ = inception.load_weights(weights_file)
  extractor = fid.InceptionFeatures(variables, sharding.create_mesh({'data': -1, 'fsdp': 1}), batch_size=2)
  for ours, theirs in zip(extractor(images), (pool_t.numpy(), logits_t.numpy())):
    assert ours.shape == theirs.shape and np.abs(theirs).max() > 0.1  # well-scaled, not vanished
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-4  # relative to the largest value


# ------------------------------------------------------------------------------------------- the command

def _write_images(folder, images):
  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.png'))
  return str(folder)


def _pattern(rng, kind):
  """A 256 px image the random network tells apart from the others: a flat colour, a coloured grating of random
  frequency and angle, or coarse random blocks."""
  yy, xx = np.mgrid[0:256, 0:256].astype(np.float32) / 256
  color = rng.uniform(0, 255, 3)
  if kind == 0:
    image = np.broadcast_to(color, (256, 256, 3))
  elif kind == 1:
    frequency, angle = rng.uniform(2, 40), rng.uniform(0, np.pi)
    image = (0.5 + 0.5 * np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle))))[..., None] * color
  else:
    image = rng.uniform(0, 255, (8, 8, 3)).repeat(32, axis=0).repeat(32, axis=1)
  return image.astype(np.uint8)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """(generated, reference) folders of 256 px PNGs: varied patterns (an IS above 1) and plain noise."""
  root, rng = tmp_path_factory.mktemp('fid_images'), np.random.default_rng(7)
  generated = [_pattern(rng, i % 3) for i in range(NUM_GENERATED)]
  reference = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(NUM_REFERENCE)]
  return _write_images(root / 'generated', generated), _write_images(root / 'reference', reference)


def _metrics(stdout):
  lines = dict(line.split(': ') for line in stdout.splitlines() if ': ' in line)
  return {k: float(lines[k]) for k in ('frechet_inception_distance', 'inception_score_mean', 'inception_score_std')}


@pytest.fixture(scope='module')
def command_metrics(folders, weights_file):
  """The command on the two folders, on 2 simulated devices (the batch of 4 sharded, the last one padded)."""
  generated, reference = folders
  result = run_cli('evaluate.fid', f'--generated={generated}', f'--reference={reference}',
                   f'--inception_weights={weights_file}', '--batch_size=4', '--trace=eigvals',
                   f'--isc_splits={ISC_SPLITS}', num_devices=2, check=True)
  assert 'sha256' in result.stderr
  return _metrics(result.stdout)


@pytest.mark.slow
def test_command_smoke(command_metrics):
  assert all(np.isfinite(v) for v in command_metrics.values())
  assert command_metrics['frechet_inception_distance'] > 1 and command_metrics['inception_score_mean'] > 1.01


@pytest.mark.slow
def test_command_matches_torch_fidelity_calculate_metrics(folders, command_metrics, weights_file):
  torch_fidelity = pytest.importorskip('torch_fidelity')
  generated, reference = folders
  theirs = torch_fidelity.calculate_metrics(
      input1=generated, input2=reference, isc=True, fid=True, isc_splits=ISC_SPLITS, cuda=False, batch_size=4,
      feature_extractor_weights_path=weights_file, cache=False, save_cpu_ram=True, verbose=False)
  for key, ours in command_metrics.items():
    assert ours == pytest.approx(theirs[key], rel=1e-3), (key, ours, theirs[key])
  # The random network's IS is near 1: its excess over 1 agrees to 1e-3 as well.
  ours, theirs = command_metrics['inception_score_mean'] - 1, theirs['inception_score_mean'] - 1
  assert ours == pytest.approx(theirs, rel=1e-3)


def test_command_errors_are_one_line(tmp_path, folders):
  generated, reference = folders
  result = run_cli('evaluate.fid', f'--generated={generated}', f'--reference={reference}',
                   f'--inception_weights={tmp_path / "absent.pth"}')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert result.stderr.strip().count('\n') == 0
  assert 'mae_jax.evaluate.fid: error:' in result.stderr and inception.WEIGHTS_SOURCES[0] in result.stderr
  assert 'nothing is downloaded' in result.stderr


def test_prepare_reference_matches_torchvision(tmp_path):
  torchvision = pytest.importorskip('torchvision')
  rng = np.random.default_rng(8)
  val = tmp_path / 'imagenet' / 'val'
  for wnid, name, (w, h), channels in (('n01', 'a.JPEG', (300, 401), 3), ('n01', 'b.png', (256, 256), 1),
                                       ('n02', 'c.jpg', (517, 333), 3), ('n02', 'd.png', (640, 257), 4)):
    os.makedirs(val / wnid, exist_ok=True)  # RGB, greyscale and RGBA files, each converted to RGB
    Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()).save(val / wnid / name)
  out = tmp_path / 'reference'
  assert fid.prepare_reference(str(val), str(out), log=lambda _: None) == 4
  transforms = torchvision.transforms
  transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(256)])
  dataset = torchvision.datasets.ImageFolder(str(val), transform=transform)  # prepare_imgnet_val.py's reading
  assert sorted(os.listdir(out)) == [f'{i:05d}.png' for i in range(4)]
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(Image.open(out / f'{i:05d}.png')), np.asarray(dataset[i][0]))


# ------------------------------------------------------------------------------------------- the evaluator

def _eval_config(**fid_fields):
  config = ml_collections.ConfigDict({'objective': 'mage', 'eval': {'fid': fid.FidEvaluator.default_config()}})
  config.eval.fid.update(fid_fields)
  return config


def test_evaluator_needs_a_generating_model():
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  with pytest.raises(ConfigError, match="'fid' needs a model that generates images"):
    fid.FidEvaluator(_eval_config(), object(), None, None, mesh)


@pytest.mark.slow
def test_evaluator_scores_generated_images_like_the_command(folders, command_metrics, weights_file, tmp_path):
  """A model whose `generate` returns the generated folder's images (as [0, 1] floats that truncate back to the
  same uint8) gets the command's FID against the reference's cached statistics."""
  generated, reference = folders
  stats_file = str(tmp_path / 'reference.npz')
  fid.main(['stats', f'--images={reference}', f'--out={stats_file}', f'--inception_weights={weights_file}',
            '--batch_size=4'])  # the command, in this process
  stats = fid.load_statistics(stats_file, inception.sha256(weights_file))
  assert stats['count'] == NUM_REFERENCE and stats['sigma'].shape == (2048, 2048)
  with pytest.raises(fid.FidError, match='computed with Inception weights of sha256'):
    fid.load_statistics(stats_file, 'f' * 64)
  images = np.stack([np.asarray(Image.open(p)) for p in fid.image_files(generated)])

  class Model:

    def generate(self, params, rng, n):
      del rng
      return (params['images'][:n].astype(np.float32) + 0.5) / 255

  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  evaluator = fid.FidEvaluator(_eval_config(inception_weights=weights_file, reference=stats_file, trace='eigvals',
                                            num_images=NUM_GENERATED, batch_size=NUM_GENERATED,
                                            isc_splits=ISC_SPLITS), Model(), None, None, mesh)
  results = evaluator({'images': images})
  assert results['gen/fid'] == pytest.approx(command_metrics['frechet_inception_distance'], rel=1e-4)
  assert results['gen/is'] == pytest.approx(command_metrics['inception_score_mean'], rel=1e-4)
