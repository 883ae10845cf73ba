"""The second-order term (docs/maths.md §15.2) against closed forms.

Gaussian data f ~ N(μ, s²I) have the exact noise prediction ε*(z) = σ(z − αμ)/v with
v = α²s² + σ², whose Jacobian is (σ/v)·I, and E[‖ε − ε*‖² | z] = D·α²s²/v.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax.evaluation import ode
from vdm_jax.model import second_order
from vdm_jax.model import vdm

D = 16
S = 0.3
MU = jnp.linspace(-0.6, 0.6, D).reshape(1, 4, 4, 1)


def _schedule(gamma):
  a2, s2 = nn.sigmoid(-gamma), nn.sigmoid(gamma)
  return jnp.sqrt(a2), jnp.sqrt(s2), a2 * S**2 + s2


def gaussian_eps(z, gamma, s=S):
  a2, s2 = nn.sigmoid(-gamma), nn.sigmoid(gamma)
  return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * MU) / (a2 * s**2 + s2)


def test_the_eps_form_is_the_v_form():
  """For ε̂ = α v̂ + σ z: λc·r²/D with r in ε equals λ(cα²)·r_v²/D, r_v = σ·tr ∂v̂/∂z −
  α(D − ‖v − v̂‖²) (i-DODE's form; cα² is the coefficient of ‖v − v̂‖²)."""
  rng = np.random.default_rng(0)
  gamma = jnp.array([-6.0, -1.0, 0.5, 3.0])
  g = gamma[:, None, None, None]
  f = jnp.asarray(rng.uniform(-1, 1, (4, 4, 4, 1)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(4, 4, 4, 1)), jnp.float32)
  v_hat = jnp.asarray(rng.normal(size=(4, 4, 4, 1)), jnp.float32)
  alpha, sigma = jnp.sqrt(nn.sigmoid(-gamma)), jnp.sqrt(nn.sigmoid(gamma))
  z = alpha[:, None, None, None] * f + sigma[:, None, None, None] * eps
  eps_hat = vdm.eps_from_v(v_hat, z, g)
  trace_v = jnp.array([3.0, -20.0, 7.5, 0.0])
  c = jnp.array([9.15, 2.0, 0.3, 40.0])
  loss_diff = c * vdm.sum_except_batch(jnp.square(eps - eps_hat))
  got = second_order.loss(0.1, alpha * trace_v + sigma * D, eps, eps_hat, gamma, loss_diff)
  sse_v = vdm.sum_except_batch(jnp.square(vdm.v_target(f, eps, g) - v_hat))
  r_v = sigma * trace_v - alpha * (D - sse_v)
  np.testing.assert_allclose(got, 0.1 * c * alpha**2 * r_v**2 / D, rtol=1e-4)


@pytest.mark.parametrize('gamma', [-8.0, -1.0, 2.0])
def test_the_residual_vanishes_for_the_exact_score_of_gaussian_data(gamma):
  """r = 0 with E[‖ε − ε*‖² | z] in place of the draw's; its mean over draws of (f, ε) is
  0 within 4 standard errors. For the ε* of other data (s = 0.5) it is not where the noise
  is comparable to the data (at γ = −8 both ε̂ are ≈ 0 and r ≈ ‖ε‖² − D either way)."""
  alpha, sigma, v = _schedule(jnp.float32(gamma))
  n = 4096
  k_f, k_e, k_p = jax.random.split(jax.random.key(0), 3)
  f = MU + S * jax.random.normal(k_f, (n, 4, 4, 1))
  eps = jax.random.normal(k_e, (n, 4, 4, 1))
  z = alpha * f + sigma * eps
  probe = jax.random.rademacher(k_p, z.shape, jnp.float32)
  eps_hat, trace = second_order.hutchinson_trace(lambda z: gaussian_eps(z, gamma), z, probe)
  np.testing.assert_allclose(trace, D * sigma / v, rtol=1e-5)  # diagonal: exact
  r = second_order.residual(trace[:1], D * alpha**2 * S**2 / v, sigma, D)
  assert abs(float(r[0])) < 1e-4 * D
  r = np.asarray(second_order.residual(
      trace, vdm.sum_except_batch(jnp.square(eps - eps_hat)), sigma, D), np.float64)
  assert abs(r.mean()) < 4 * r.std(ddof=1) / math.sqrt(n)
  eps_hat, trace = second_order.hutchinson_trace(lambda z: gaussian_eps(z, gamma, 0.5), z, probe)
  wrong = np.asarray(second_order.residual(
      trace, vdm.sum_except_batch(jnp.square(eps - eps_hat)), sigma, D), np.float64)
  assert abs(wrong.mean()) > 10 * wrong.std(ddof=1) / math.sqrt(n) or gamma < -4


@pytest.fixture(scope='module')
def tiny_vdm():
  """A perturbed tiny v-network with the term on (4×4 images) and a batch of z_t."""
  cfg = common.tiny_model_config(prediction='v')
  _, variables = common.init_model(cfg, shape=(3, 4, 4, 1))  # the same parameters
  cfg.second_order_weight = 0.1
  model = vdm.VDM.from_config(cfg)
  params = common.perturb(variables['params'], jax.random.key(3), scale=0.3,
                          predicate=lambda name: 'score_model' in name)
  z = jax.random.normal(jax.random.key(4), (3, 4, 4, 1))
  return model, {'params': params}, z


def test_the_one_probe_trace_is_unbiased(tiny_vdm):
  """The mean of vᵀ(∂ε̂/∂z)v over 256 probes (VDM.score through nn.jvp) is within 4
  standard errors of the exact trace (D vector-Jacobian products)."""
  model, variables, z = tiny_vdm
  gamma, cond = jnp.full((3,), -2.0), jnp.zeros((3,))
  trace_of = lambda key: model.apply(
      variables, z, gamma, cond, True, rngs={'sample': key},
      method=lambda mdl, *a: second_order.score_and_trace(mdl, *a)[1])
  traces = np.asarray(jax.jit(jax.vmap(trace_of))(jax.random.split(jax.random.key(5), 256)))
  _, vjp_fn = jax.vjp(lambda z_: model.apply(variables, z_, gamma, cond, method=vdm.VDM.score), z)
  exact = np.asarray(ode.trace_exact(vjp_fn, z, 16))
  stderr = traces.std(axis=0, ddof=1) / math.sqrt(len(traces))
  assert np.all(stderr > 1e-2)  # the Jacobian is not diagonal: the probes do vary
  assert np.all(np.abs(traces.mean(axis=0) - exact) < 4 * stderr)


def _objective(variables, x, **model_fields):
  """(mean objective, VDMOutput) of the tiny network as a model with these fields."""
  model = vdm.VDM.from_config(common.tiny_model_config(**model_fields))

  def objective(params):
    out = model.apply({'params': params}, x, jnp.zeros((x.shape[0],)), deterministic=False,
                      rngs={'sample': jax.random.key(0), 'dropout': jax.random.key(1)})
    return jnp.mean(out.objective), out

  return objective


def _assert_joins_the_objective(on):
  assert np.all(on.loss_second_order > 0)
  np.testing.assert_allclose(
      on.objective, on.loss_recon + on.loss_klz + on.loss_diff_weighted + on.loss_second_order,
      rtol=1e-6)


def test_the_term_joins_the_objective(tiny_vdm):
  """v-prediction, the sigmoid proposal (i-DODE's setting): objective = the bound's terms
  + L_2 > 0, and the other draws as with the term off (the probe is drawn last, so a
  run with λ = 0 draws what it drew without the term). Its gradients: tests/test_train.py."""
  _, variables, _ = tiny_vdm
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1)))
  fields = dict(prediction='v', time_sampling='sigmoid')
  _, on = jax.jit(_objective(variables, x, second_order_weight=0.1, **fields))(
      variables['params'])
  _assert_joins_the_objective(on)
  _, off = jax.jit(_objective(variables, x, **fields))(variables['params'])
  np.testing.assert_array_equal(off.loss_second_order, 0.0)
  np.testing.assert_array_equal(on.gamma_t, off.gamma_t)
  np.testing.assert_array_equal(on.loss_diff, off.loss_diff)


@pytest.mark.slow
def test_the_term_joins_the_discrete_eps_objective(tiny_vdm):
  """ε-prediction, discrete time (T = 10), uniform time."""
  _, variables, _ = tiny_vdm
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1)))
  _, on = jax.jit(_objective(variables, x, second_order_weight=0.1, prediction='eps',
                             time_sampling='uniform', timesteps=10))(variables['params'])
  _assert_joins_the_objective(on)
