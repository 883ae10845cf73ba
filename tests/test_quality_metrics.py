"""Tests of vdm_jax.evaluation.quality_metrics: the Fréchet distance, precision, recall,
density, coverage and the class statistics (docs/maths.md §12)."""

import numpy as np
import prdc
import pytest
import scipy.linalg

from vdm_jax.evaluation import quality_metrics


def _gaussian(n, d, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return scale * rng.normal(size=(n, d)) @ mix


def test_the_distance_of_a_set_to_itself_is_zero_and_a_shift_adds_its_square():
  x = _gaussian(300, 16, 0)
  trace = np.trace(np.cov(x, rowvar=False))
  assert abs(quality_metrics.frechet_distance(x, x)) < 1e-9 * trace
  shift = np.linspace(-1.0, 2.0, 16)  # equal covariances: FD = ‖Δμ‖² exactly
  assert quality_metrics.frechet_distance(x, x + shift) == pytest.approx(
      np.sum(shift ** 2), rel=1e-9, abs=1e-9 * trace)


def test_the_distance_agrees_with_scipy_sqrtm():
  a, b = _gaussian(400, 12, 1), _gaussian(500, 12, 2, scale=1.5) + 0.3
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(cov_a @ cov_b).real
  expected = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
  assert quality_metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
  assert quality_metrics.frechet_distance(b, a) == pytest.approx(expected, rel=1e-8)


def test_a_set_against_itself_has_precision_recall_and_coverage_one():
  x = _gaussian(200, 8, 3)
  out = quality_metrics.prdc(x, x, k=5)
  assert out['precision'] == out['recall'] == out['coverage'] == 1.0


@pytest.mark.parametrize('chunk', [1024, 7])
def test_prdc_equals_naeem_et_al_reference_code(chunk, capsys):
  real, fake = _gaussian(150, 10, 4), _gaussian(120, 10, 5, scale=1.3) + 0.2
  ours = quality_metrics.prdc(real, fake, k=5, chunk=chunk)
  theirs = prdc.compute_prdc(real, fake, nearest_k=5)
  capsys.readouterr()  # the reference code prints the set sizes
  for name, value in theirs.items():
    assert ours[name] == pytest.approx(float(value), abs=1e-12), name
  assert 0.1 < ours['precision'] < 0.99 and 0.1 < ours['recall'] < 0.99  # a real test


def test_prdc_needs_more_than_k_vectors():
  with pytest.raises(ValueError, match='need more than 5 vectors'):
    quality_metrics.prdc(np.zeros((5, 2)), np.zeros((50, 2)), k=5)


def test_class_statistics():
  uniform = np.eye(10)[np.arange(100) % 10] * 0.95 + 0.005  # every class, confident
  out = quality_metrics.class_statistics(uniform, confidence=0.9)
  assert out['confident_share'] == 1.0 and out['class_counts'] == [10] * 10
  assert out['class_entropy_bits'] == pytest.approx(np.log2(10), rel=1e-12)
  unsure = np.full((4, 10), 0.1)
  unsure[:, 3] += 0.05
  out = quality_metrics.class_statistics(unsure, confidence=0.9)
  assert out['confident_share'] == 0.0 and out['class_entropy_bits'] == 0.0
  halves = np.eye(2)[[0, 0, 1, 1]]
  assert quality_metrics.class_statistics(halves)['class_entropy_bits'] == pytest.approx(1.0)
