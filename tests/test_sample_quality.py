"""Tests of vdm_jax.evaluation.sample_quality and of --mode=sample's numbers
(docs/maths.md §12)."""

import json
import shutil

import numpy as np
import pytest

import common
from vdm_jax.data import datasets
from vdm_jax.evaluation import feature_net
from vdm_jax.evaluation import sample_quality


@pytest.fixture
def judged(digits_features):
  """configs/test.py (sklearn's digits), its feature network (tests/conftest.py), the test split."""
  cfg, network = digits_features
  return cfg, network, datasets.load_split(cfg.data, 'test')


def _without_times(results):
  return {k: v for k, v in results.items() if not k.startswith('seconds')}


def test_the_test_split_against_itself(judged):
  cfg, network, test = judged
  out = sample_quality.evaluate_samples(test, cfg, network)
  trace = np.trace(np.cov(network.features(test).astype(np.float64), rowvar=False))
  # Dead ReLU units leave Σ singular; rounding moves its zero eigenvalues by ~1e-16·‖Σ‖,
  # and their square roots by ~1e-8·‖Σ‖ each.
  assert abs(out['samples']['frechet_distance']) < 1e-6 * trace
  assert out['samples']['precision'] == out['samples']['recall'] == 1.0
  assert out['samples']['coverage'] == 1.0
  assert out['samples']['class_counts'] == out['reference']['class_counts']
  # Real digits the network has seen are near; independent pixels far.
  assert 0 < out['floor']['frechet_distance'] < out['ceiling']['frechet_distance'] / 5
  assert out['floor']['recall'] > out['ceiling']['recall']
  assert out['feature_network'] == network.info and out['samples']['num_images'] == 297


def test_shuffled_pixels_are_far_from_the_test_split(judged):
  cfg, network, test = judged
  order = np.random.default_rng(0).permutation(64)
  shuffled = test.reshape(297, 64)[:, order].reshape(test.shape)  # same pixels, no shapes
  out = sample_quality.evaluate_samples(shuffled, cfg, network)
  assert out['samples']['frechet_distance'] > 5 * out['floor']['frechet_distance']
  assert out['samples']['recall'] < out['floor']['recall'] / 2


def test_the_numbers_are_reproducible_bit_for_bit(judged):
  cfg, network, test = judged
  samples = test[::-1][:200]
  first = sample_quality.evaluate_samples(samples, cfg, network)
  again = sample_quality.evaluate_samples(samples, cfg, feature_net.load_or_train(cfg))
  assert json.dumps(_without_times(first), sort_keys=True) == json.dumps(
      _without_times(again), sort_keys=True)


def test_independent_pixels_copy_each_pixel_from_its_own_column():
  train_images = np.zeros((50, 3, 3, 1), np.uint8)
  train_images[:, 0, 0, 0] = 7  # a constant pixel
  train_images[:, 2, 2, 0] = np.arange(50) % 2 * 5  # two values, equally often
  drawn = sample_quality.independent_pixels(train_images, 4000, seed=0)
  assert drawn.shape == (4000, 3, 3, 1) and (drawn[:, 0, 0, 0] == 7).all()
  assert set(np.unique(drawn[:, 2, 2, 0])) == {0, 5}
  share = (drawn[:, 2, 2, 0] == 5).mean()
  assert abs(share - 0.5) < 4 * np.sqrt(0.25 / 4000)  # four binomial standard deviations
  np.testing.assert_array_equal(drawn, sample_quality.independent_pixels(train_images, 4000, 0))


def test_a_users_feature_function_replaces_the_network(judged):
  cfg, _, test = judged
  pixels = lambda images: images.reshape(len(images), -1).astype(np.float64)
  out = sample_quality.evaluate_samples(test[:100], cfg, pixels)
  assert out['feature_network']['kind'] == 'user'
  assert 'confident_share' not in out['samples'] and out['samples']['precision'] == 1.0
  assert 'frechet_distance' in out['ceiling'] and 'frechet_distance' in out['floor']
  assert 'test accuracy' not in sample_quality.summary(out)


@pytest.mark.slow
def test_sample_mode_reports_the_numbers(trained_test_workdir, tmp_path):
  workdir, refused = tmp_path / 'run', tmp_path / 'refused'
  for path in (workdir, refused):
    shutil.copytree(trained_test_workdir, path)
  sample = ('-m', 'vdm_jax.main', '--config=configs/test.py', '--mode=sample',
            '--config.quality.num_samples=24', '--config.quality.batch_size=16',
            '--config.quality.feature_steps=20')
  blocker = tmp_path / 'file'
  blocker.write_text('')
  bad, proc = common.run_commands(
      (*sample, f'--workdir={refused}', f'--config.quality.cache_dir={blocker}/cache'),
      (*sample, f'--workdir={workdir}', f'--config.quality.cache_dir={tmp_path / "cache"}'))
  assert bad.returncode == 2 and 'error: config.quality.cache_dir' in bad.stderr
  assert not list(refused.glob('samples_*.png'))  # it stopped before sampling
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'sample quality: 24 samples against the 297 test images' in proc.stdout
  results = json.loads((workdir / 'sample_quality.json').read_text())
  assert results == json.loads((workdir / 'sample_quality_6.json').read_text())
  assert results['step'] == 6 and results['timesteps'] == 5 and results['use_ema']
  for name in sample_quality.SETS:
    assert results[name]['num_images'] == 24
    assert set(sample_quality.METRICS) <= set(results[name])
  assert list(workdir.glob('samples_6.png'))
  assert any(p.name.startswith('events.out.tfevents') for p in workdir.iterdir())
