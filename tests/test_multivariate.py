"""The mulan schedule: a learned polynomial γ per sub-pixel and its latent (docs/maths.md §13)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

import common
from vdm_jax import config_base
from vdm_jax import validation
from vdm_jax.model import multivariate
from vdm_jax.model import vdm
from vdm_jax.training import train

G0, G1 = -13.3, 5.0


def _coefficients(seed, shape=(6,), scale=3.0):
  rng = np.random.default_rng(seed)
  a, b, raw_d = (jnp.asarray(rng.standard_normal(shape).astype(np.float32) * scale)
                 for _ in range(3))
  return a, b, 1e-3 + jax.nn.softplus(raw_d)


def test_polynomial_integral_is_the_integral_of_the_square():
  a, b, d = _coefficients(0)
  for t in (0.0, 0.13, 0.5, 1.0):
    ours = np.asarray(multivariate.polynomial_integral(a, b, d, jnp.float32(t)))
    for i in range(a.shape[0]):
      exact = integrate.quad(lambda s: (float(a[i]) * s * s + float(b[i]) * s
                                        + float(d[i])) ** 2, 0.0, t)[0]
      np.testing.assert_allclose(ours[i], exact, rtol=1e-5, atol=1e-7)


def test_each_gamma_is_monotone_with_the_shared_endpoints_exactly():
  a, b, d = _coefficients(1, shape=(50,))
  t = jnp.linspace(0.0, 1.0, 1001)[:, None]
  gamma, gamma_prime = multivariate.polynomial_schedule(a, b, d, t, G0, G1)
  gamma = np.asarray(gamma)
  assert np.all(gamma[0] == np.float32(G0)) and np.all(gamma[-1] == np.float32(G1))
  # P′ = (a t² + b t + d)² ≥ 0: non-decreasing up to float32 rounding of |γ| ≤ 13.3.
  assert np.all(np.diff(gamma, axis=0) >= -1e-5)
  assert np.all(np.asarray(gamma_prime) >= 0.0)
  # Some sub-pixels really are non-linear (the test would pass for a linear γ too).
  assert np.max(np.abs(gamma[500] - (G0 + G1) / 2)) > 1.0


def test_closed_form_derivative_equals_forward_mode():
  a, b, d = _coefficients(2, shape=(20,))
  t = jnp.linspace(0.0, 1.0, 11)[:, None]
  _, closed = multivariate.polynomial_schedule(a, b, d, t, G0, G1)
  gamma = lambda s: multivariate.polynomial_schedule(a, b, d, s, G0, G1)[0]
  _, forward = jax.jvp(gamma, (t,), (jnp.ones_like(t),))
  np.testing.assert_allclose(closed, forward, rtol=1e-4, atol=1e-4)


def test_continuous_term_is_the_limit_of_the_discrete_one():
  """§13.3: per sub-pixel, L_T − L_∞ = O(1/T) at the same (ε, ε̂, t)."""
  shape = (4, 3, 3, 1)
  a, b, d = _coefficients(3, shape=shape[1:], scale=1.0)
  eps = jax.random.normal(jax.random.key(0), shape)
  eps_hat = eps + 0.3 * jax.random.normal(jax.random.key(1), shape)
  t = jnp.array([0.2, 0.4, 0.6, 0.8])[:, None, None, None]  # on the grid of every T
  gamma = lambda s: multivariate.polynomial_schedule(a, b, d, s, G0, G1)
  g_t, g_prime = gamma(t)
  l_inf = multivariate.diffusion_loss_continuous(g_prime, eps, eps_hat)
  gaps = {}
  for T in (10, 100, 1000):
    l_T = multivariate.diffusion_loss_discrete(g_t, gamma(t - 1.0 / T)[0], T, eps, eps_hat)
    gaps[T] = np.abs(np.asarray(l_T / l_inf - 1.0))
  assert np.all(gaps[10] > gaps[100]) and np.all(gaps[100] > gaps[1000])
  np.testing.assert_allclose(gaps[100] / gaps[1000], 10.0, rtol=0.25)
  assert np.all(gaps[1000] < 0.02)


def test_latent_kl_is_nonnegative_and_zero_at_the_prior():
  logits = jax.random.normal(jax.random.key(0), (5, 3, 7)) * 2.0
  kl = np.asarray(multivariate.latent_kl(logits))
  q = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
  exact = np.sum(q * (np.log(q) + math.log(7)), axis=(1, 2))
  np.testing.assert_allclose(kl, exact, rtol=1e-5)
  assert np.all(kl > 0)
  np.testing.assert_allclose(multivariate.latent_kl(jnp.zeros((2, 3, 7))), 0.0, atol=1e-6)


def test_latent_draws_follow_q_with_the_softmax_gradient():
  logits = jnp.array([[[2.0, 0.0, -1.0, 0.5]]])
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = jax.vmap(lambda k: multivariate.draw_latent(k, logits))(keys)[:, 0]
  assert np.all(np.asarray(draws).sum(axis=-1) == 1.0)
  p = np.asarray(jax.nn.softmax(logits[0, 0]))
  stderr = np.sqrt(p * (1 - p) / len(keys))
  assert np.all(np.abs(np.asarray(draws).mean(axis=0) - p) < 4 * stderr)
  weights = jnp.array([1.0, -2.0, 0.5, 3.0])
  straight = jax.grad(lambda l: jnp.sum(weights * multivariate.draw_latent(keys[0], l)))
  soft = jax.grad(lambda l: jnp.sum(weights * jax.nn.softmax(l, axis=-1)))
  np.testing.assert_allclose(straight(logits), soft(logits), rtol=1e-6)


def _two_models(first_cfg, second_cfg, shape):
  """(first, its params, second, its params): the first network perturbed so that it
  computes something, the second given the same network parameters."""
  first, first_vars = common.init_model(first_cfg, shape)
  first_params = common.perturb(first_vars['params'], jax.random.key(7), scale=0.1,
                                predicate=lambda p: p.startswith('score_model'))
  second, second_vars = common.init_model(second_cfg, shape)
  second_params = dict(second_vars['params'], score_model=first_params['score_model'])
  return first, first_params, second, second_params


@pytest.mark.parametrize('prediction', ['eps', 'v'])
def test_linear_mulan_without_latent_equals_the_learned_linear_bound(prediction):
  """a = b = 0 (any d) and no latent: γ_i = γ_0 + (γ_1 − γ_0)·t for every sub-pixel, so
  the bound is the learned_linear model's to float32 rounding, in both times."""
  shape = (4, 8, 8, 1)
  scalar_cfg = common.tiny_model_config(schedule='learned_linear', prediction=prediction)
  mulan_cfg = common.tiny_model_config(schedule='mulan', prediction=prediction,
                                       mulan_latent_draws=0)
  scalar, scalar_params, mulan, mulan_params = _two_models(scalar_cfg, mulan_cfg, shape)
  raw = np.zeros((3, *shape[1:]), np.float32)
  raw[2] = np.random.default_rng(0).standard_normal(shape[1:])  # d varies per sub-pixel
  mulan_params['gamma']['coefficients']['coefficients'] = jnp.asarray(raw)
  x = jax.random.randint(jax.random.key(1), shape, 0, 256)
  cond = jnp.zeros((shape[0],))
  for T in (0, 10):
    run = lambda m, p: m.apply({'params': p}, x, cond, timesteps=T,
                               rngs={'sample': jax.random.key(3)})
    ours, theirs = run(mulan, mulan_params), run(scalar, scalar_params)
    np.testing.assert_allclose(ours.loss_diff, theirs.loss_diff, rtol=2e-5)
    np.testing.assert_allclose(ours.bpd, theirs.bpd, rtol=2e-5)
    np.testing.assert_array_equal(ours.loss_latent, 0.0)


def test_an_ignored_latent_adds_exactly_its_kl():
  """With the latent's inputs to the network zeroed and the schedule not reading it
  (zero-initialised output), the bound is the latent-free one plus KL(q(c|x) ‖ p(c))."""
  shape = (4, 8, 8, 1)
  plain_cfg = common.tiny_model_config(schedule='mulan', mulan_latent_draws=0)
  latent_cfg = common.tiny_model_config(schedule='mulan', mulan_latent_draws=3,
                                        mulan_latent_classes=5)
  plain, plain_params, latent, params = _two_models(plain_cfg, latent_cfg, shape)
  dense0 = dict(params['score_model']['dense0'])
  kernel = plain_params['score_model']['dense0']['kernel']
  dense0['kernel'] = jnp.concatenate(  # the latent's 5 rows come last, set to zero
      [kernel, jnp.zeros((5, kernel.shape[1]))])
  params['score_model'] = dict(params['score_model'], dense0=dense0)
  params['latent_encoder'] = common.perturb(
      params['latent_encoder'], jax.random.key(8), scale=1.0)
  x = jax.random.randint(jax.random.key(1), shape, 0, 256)
  cond = jnp.zeros((shape[0],))
  run = lambda m, p: m.apply({'params': p}, x, cond, rngs={'sample': jax.random.key(3)})
  with_latent, without = run(latent, params), run(plain, plain_params)
  assert np.all(np.asarray(with_latent.loss_latent) > 0)
  kl_bpd = vdm.bits_per_dim(with_latent.loss_latent, math.prod(shape[1:]))
  np.testing.assert_allclose(with_latent.bpd - kl_bpd, without.bpd, rtol=2e-5)


def test_sampler_draws_the_latent_from_its_prior():
  cfg = common.tiny_model_config(schedule='mulan', mulan_latent_draws=3,
                                 mulan_latent_classes=5, vocab_size=17)
  model, variables = common.init_model(cfg)
  sample = jax.jit(lambda key: model.apply(variables, key, (4, 8, 8, 1), timesteps=8,
                                           method=vdm.VDM.sample))
  a, b = np.asarray(sample(jax.random.key(0))), np.asarray(sample(jax.random.key(0)))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (4, 8, 8, 1) and a.min() >= 0 and a.max() < 17
  prior = multivariate.draw_prior_latent(jax.random.key(0), 1000, 3, 5)
  np.testing.assert_array_equal(np.asarray(prior).sum(axis=1), 3)
  np.testing.assert_allclose(np.asarray(prior).mean(axis=0), 3 / 5, atol=0.1)


def test_what_does_not_work_with_mulan_is_refused_with_a_message():
  config = config_base.get_config()
  config.model.schedule = 'mulan'
  assert not validation.check_fields(config)
  config.model.time_sampling = 'sigmoid'
  config.eval.estimator = 'ode'
  config.model.mulan_latent_classes = 1
  config.model.second_order_weight = 0.1
  messages = '\n'.join(validation.check_fields(config))
  assert "time_sampling = 'sigmoid'" in messages and "'adaptive'" in messages
  assert "eval.estimator = 'ode'" in messages
  assert 'mulan_latent_classes = 1' in messages
  assert 'second_order_weight = 0.1' in messages
  with pytest.raises(validation.ConfigError, match='--mode=compress does not support'):
    validation.refuse_unsupported_mode(config, 'compress')
  validation.refuse_unsupported_mode(config, 'eval')


@pytest.mark.slow  # three short training runs of a tiny model
def test_resume_is_bit_identical(tmp_path):
  cfg = common.load_config('test')
  cfg.model.update(schedule='mulan', mulan_latent_draws=3, mulan_latent_classes=5,
                   time_sampling='adaptive')
  cfg.training.update(num_steps=2, steps_per_call=1, checkpoint_every=1, log_every=1)
  full = train.train_and_evaluate(cfg, str(tmp_path / 'full'))
  cfg.training.num_steps = 1
  train.train_and_evaluate(cfg, str(tmp_path / 'resumed'))
  cfg.training.num_steps = 2
  resumed = train.train_and_evaluate(cfg, str(tmp_path / 'resumed'))
  assert int(resumed.step) == 2
  common.assert_trees_equal(jax.device_get(resumed), jax.device_get(full))
