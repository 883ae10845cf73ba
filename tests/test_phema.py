"""Power-function EMA profiles and their post-hoc reconstruction (docs/maths.md §14)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax import validation
from vdm_jax.training import phema

SIGMA_RELS = (0.05, 0.10)
T, EVERY = 2000, 100  # steps simulated, steps between snapshots
EPS32 = float(np.finfo(np.float32).eps)


def _weights(t: int, gamma: float) -> np.ndarray:
  """w_s, s = 1..t: the discrete EMA's weight of θ_s, (s^(γ+1) − (s−1)^(γ+1)) / t^(γ+1)."""
  s = np.arange(1, t + 1, dtype=np.float64)
  return (s / t) ** (gamma + 1) - ((s - 1) / t) ** (gamma + 1)


def _trajectory(seed: int = 0) -> dict:
  """θ_s for s = 1..T, float32 [T, ...]: a drift, an oscillation and noise per parameter."""
  rng = np.random.default_rng(seed)
  s = np.arange(1, T + 1, dtype=np.float64) / T
  def leaf(*shape):
    a, b, c = (rng.normal(size=shape) for _ in range(3))
    grow = lambda v: v.reshape((1,) + shape)
    noise = 0.05 * rng.normal(size=(T,) + shape)
    return (grow(a) + grow(b) * s.reshape((-1,) + (1,) * len(shape))
            + grow(c) * np.sin(7 * s).reshape((-1,) + (1,) * len(shape)) + noise
            ).astype(np.float32)
  return {'dense': {'kernel': leaf(6, 5), 'bias': leaf(5)}, 'scale': leaf()}


@functools.lru_cache(maxsize=None)
def _tracked():
  """(trajectory, profiles after every step [T, K, ...]) of SIGMA_RELS, tracked in float32
  by phema.update as the train step does."""
  theta = _trajectory()
  gammas = phema.gammas(SIGMA_RELS)

  def step(profiles, inputs):
    k, params = inputs
    profiles = phema.update(profiles, params, k, gammas)
    return profiles, profiles
  first = jax.tree.map(lambda x: x[0], theta)
  _, history = jax.lax.scan(step, phema.init(first, len(SIGMA_RELS)),
                            (jnp.arange(T, dtype=jnp.int32), theta))
  return theta, jax.tree.map(np.asarray, history)


def _reconstruct(sigma_rels, step):
  """Reconstruction from the snapshots every EVERY steps of _tracked()."""
  _, history = _tracked()
  steps = list(range(EVERY, T + 1, EVERY))
  snapshots = [(t, phema.gammas(SIGMA_RELS)) for t in steps]
  load = lambda j: jax.tree.map(lambda h: h[steps[j] - 1], history)
  return phema.reconstruct(snapshots, load, sigma_rels, step)


def test_sigma_rel_and_gamma_are_inverse():
  assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
  assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
  for sigma_rel in (0.001, 0.01, 0.05, 0.1, 0.2, phema.SIGMA_REL_MAX):
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    assert phema.gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # …and the largest root: the cubic is positive beyond it.
    s = sigma_rel ** -2
    cubic = lambda g: g**3 + 7 * g**2 + (16 - s) * g + 12 - s
    assert abs(cubic(gamma)) < 1e-9 * s * max(gamma, 1.0) and cubic(gamma + 1e-3) > 0
  assert phema.sigma_rel_to_gamma(phema.SIGMA_REL_MAX) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match='outside'):
    phema.sigma_rel_to_gamma(0.3)


def test_tracked_profile_is_the_closed_form_weighted_sum():
  theta, history = _tracked()
  for k, gamma in enumerate(phema.gammas(SIGMA_RELS)):
    for t in (1, 7, 150, T):
      w = _weights(t, gamma)
      assert w.sum() == pytest.approx(1.0, abs=1e-12)
      expected = jax.tree.map(lambda x, w=w, t=t: np.tensordot(w, x[:t].astype(np.float64), 1),
                              theta)
      got = jax.tree.map(lambda h, k=k, t=t: h[t - 1, k], history)
      scale = max(np.abs(x).max() for x in jax.tree.leaves(theta))
      # t float32 updates, each rounding once or twice: error ≲ 2t ε·max|θ|, far less in
      # practice (random rounding); t·ε bounds it here.
      for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, e, rtol=0, atol=max(t, 4) * EPS32 * scale)


def test_inner_products_match_quadrature():
  tau = np.linspace(0.0, 1.0, 400_001)
  for (t_a, g_a), (t_b, g_b) in (((300.0, 16.97), (1000.0, 6.94)),
                                 ((1000.0, 6.94), (300.0, 16.97)),
                                 ((800.0, 2.0), (800.0, 30.0)), ((50.0, 0.0), (60.0, 0.0))):
    x = tau * min(t_a, t_b)  # the product is 0 beyond the shorter profile
    p = lambda t, g: (g + 1) * x**g / t ** (g + 1)
    quad = np.trapezoid(p(t_a, g_a) * p(t_b, g_b), x)
    assert phema.inner_products(t_a, g_a, t_b, g_b) == pytest.approx(quad, rel=1e-6)
    assert phema.inner_products(t_a, g_a, t_b, g_b) == phema.inner_products(t_b, g_b, t_a, g_a)


@pytest.mark.parametrize('k, step', [(0, T), (1, T), (1, 1000), (0, 300)])
def test_reconstructing_a_tracked_profile_gives_it_to_float32_rounding(k, step):
  _, history = _tracked()
  (got,), error = _reconstruct([SIGMA_RELS[k]], step)
  assert error[0] < 1e-6  # the target is one of the snapshots' profiles
  tracked = jax.tree.map(lambda h: h[step - 1, k], history)
  for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(tracked)):
    np.testing.assert_allclose(g, e, rtol=0, atol=4 * EPS32 * np.abs(e).max())


def test_reconstruction_matches_the_closed_form_ema_of_a_trajectory():
  theta, _ = _tracked()
  sigma_rels = (0.03, 0.07, 0.15)
  got, error = _reconstruct(sigma_rels, T)
  # ‖θ(·)‖ on [0, T], θ piecewise constant: the discrete EMA is ∫ p(τ) θ(τ) dτ exactly.
  theta_norm = jax.tree.map(lambda x: np.sqrt(np.sum(x.astype(np.float64) ** 2, 0)), theta)
  for sigma_rel, tree, fit in zip(sigma_rels, got, error):
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    target_norm = math.sqrt(phema.inner_products(T, gamma, T, gamma))
    expected = jax.tree.map(lambda x: np.tensordot(_weights(T, gamma), x.astype(np.float64), 1),
                            theta)
    assert fit < 0.05, (sigma_rel, fit)  # inside the tracked range: a close fit
    for g, e, n in zip(jax.tree.leaves(tree), jax.tree.leaves(expected),
                       jax.tree.leaves(theta_norm)):
      # Cauchy–Schwarz: |∫ (p_rec − p*) θ| ≤ ‖p_rec − p*‖·‖θ‖, plus float32 tracking.
      bound = fit * target_norm * n + 1e-4 * np.abs(e).max()
      assert np.all(np.abs(g - e) <= bound), (sigma_rel, np.abs(g - e).max())
    # …and far closer than the nearest tracked profile, the best one could do without.
    nearest = min(SIGMA_RELS, key=lambda s: abs(math.log(s / sigma_rel)))
    (other,), _ = _reconstruct([nearest], T)
    err = lambda tree: max(np.abs(g - e).max() for g, e in
                           zip(jax.tree.leaves(tree), jax.tree.leaves(expected)))
    assert err(tree) < 0.25 * err(other), (sigma_rel, err(tree), err(other))


def test_a_constant_parameter_is_reproduced_exactly():
  snapshots = [(t, phema.gammas(SIGMA_RELS)) for t in (100, 200, 400, 800)]
  const = {'w': np.full((2, 3), 0.7, np.float32)}
  load = lambda j: jax.tree.map(lambda x: np.stack([x, x]), const)
  (got,), _ = phema.reconstruct(snapshots, load, [0.03], 800)
  np.testing.assert_allclose(got['w'], 0.7, rtol=8 * EPS32)


def test_config_problems_are_named():
  cfg = common.load_config('test')
  cfg.phema.sigma_rels = (0.05, 0.5)
  cfg.phema.snapshot_every = 0
  cfg.eval.phema_sigma_rel = 0.05
  cfg.eval.use_ema = False
  cfg.data.validation_size = -1
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(cfg)
  message = str(e.value)
  for field in ('phema.sigma_rels', 'phema.snapshot_every', 'eval.use_ema',
                'data.validation_size'):
    assert f'config.{field}' in message, (field, message)
