"""The probability-flow ODE (docs/maths.md §10) against closed forms.

Gaussian data f ~ N(μ, s²I) diffuse to q(z_t) = N(α_t μ, v_t I), v_t = α_t² s² + σ_t²,
whose optimal noise prediction ε̂*(z, γ_t) = σ_t (z − α_t μ)/v_t is plugged in as the
network. The flow of (10.3) is then the affine map z_t = α_t μ + √(v_t/v_ε)(z_ε − α_ε μ)
and ∫_ε^1 div dt = (D/2)·log(v_1/v_ε), both exact.
"""

import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

import common
from vdm_jax.evaluation import ode

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0
SHAPE = (4, 4, 4, 1)  # B, H, W, C
D = 16
S = 0.3
MU = jnp.linspace(-0.6, 0.6, D).reshape((1,) + SHAPE[1:])


def gamma_fn(t):
  return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * jnp.asarray(t, jnp.float32)


def gaussian_eps(z, gamma_t):
  """ε̂*(z, γ_t) = σ_t (z − α_t μ)/v_t of the Gaussian data."""
  g = gamma_t[:, None, None, None]
  a2, s2 = nn.sigmoid(-g), nn.sigmoid(g)
  return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * MU) / (a2 * S**2 + s2)


def alpha_and_variance(t):
  g = gamma_fn(t)
  a2 = nn.sigmoid(-g)
  return jnp.sqrt(a2), a2 * S**2 + nn.sigmoid(g)


def data_latents(t, seed=0):
  """Draws of q(z_t) of the Gaussian data."""
  alpha, v = alpha_and_variance(t)
  noise = jax.random.normal(jax.random.key(seed), SHAPE)
  return alpha * MU + jnp.sqrt(v) * noise


def solve(eps_fn, z, opts, t0=None, t1=1.0, probes=None):
  t0 = opts.t_eps if t0 is None else t0
  return jax.jit(lambda z, p: ode.integrate(eps_fn, gamma_fn, z, t0, t1, opts, p))(z, probes)


OPTS = ode.Options(solver='dopri5', rtol=1e-5, atol=1e-5, trace='exact', t_eps=1e-5)
NET_OPTS = dataclasses.replace(OPTS, rtol=1e-4, atol=1e-4)


def test_drift_is_the_probability_flow_of_the_vp_sde():
  """dz/dt = f z − ½ g² ∇log p with f = −½σ²γ', g² = σ²γ', ∇log p = −ε̂/σ (10.1–10.3)."""
  z, eps_hat = jnp.array([0.3, -1.2]), jnp.array([0.7, 0.1])
  gamma, gamma_prime = -2.0, 7.5
  s2 = nn.sigmoid(gamma)
  expected = -0.5 * s2 * gamma_prime * z - 0.5 * s2 * gamma_prime * (-eps_hat / jnp.sqrt(s2))
  np.testing.assert_allclose(ode.drift(eps_hat, z, jnp.sqrt(s2), gamma_prime), expected,
                             rtol=1e-6)


def test_gaussian_flow_and_log_density_match_the_closed_form():
  """z(1) and ∫div within the solver's tolerance (global error ≲ 100·tol here)."""
  z = data_latents(OPTS.t_eps)
  flow = solve(gaussian_eps, z, OPTS)
  alpha_e, v_e = alpha_and_variance(OPTS.t_eps)
  alpha_1, v_1 = alpha_and_variance(1.0)
  z_1 = alpha_1 * MU + jnp.sqrt(v_1 / v_e) * (z - alpha_e * MU)
  delta = 0.5 * D * jnp.log(v_1 / v_e)  # ≈ 19 nats
  assert bool(flow.ok)
  np.testing.assert_allclose(flow.z, z_1, atol=100 * OPTS.atol)
  np.testing.assert_allclose(flow.delta_logp[:, 0], delta, rtol=100 * OPTS.rtol)
  # (10.4) with the exact q_1 in place of N(0, I) gives the exact log q_ε(z_ε).
  log_q1 = -0.5 * jnp.sum((flow.z - alpha_1 * MU) ** 2 / v_1 + jnp.log(2 * jnp.pi * v_1),
                          axis=(1, 2, 3))
  log_qe = -0.5 * jnp.sum((z - alpha_e * MU) ** 2 / v_e + jnp.log(2 * jnp.pi * v_e),
                          axis=(1, 2, 3))
  np.testing.assert_allclose(log_q1 + flow.delta_logp[:, 0], log_qe, atol=1e-2)
  # And ode.log_prob, with the N(0, I) prior, is log N(z_1; 0, I) + ∫div.
  logp, _ = jax.jit(lambda z: ode.log_prob(gaussian_eps, gamma_fn, z, OPTS, jax.random.key(0)))(z)
  expected = -0.5 * jnp.sum(z_1**2 + math.log(2 * math.pi), axis=(1, 2, 3)) + delta
  np.testing.assert_allclose(logp[:, 0], expected, atol=1e-2)


def test_function_evaluations_are_counted_exactly():
  calls = [0]

  def counted(z, g):
    jax.debug.callback(lambda: calls.__setitem__(0, calls[0] + 1))
    return gaussian_eps(z, g)

  z = data_latents(OPTS.t_eps)
  for opts in (OPTS, ode.Options(solver='tsit5', num_steps=7, trace='exact'),
               ode.Options(solver='heun', num_steps=5, trace='exact'),
               ode.Options(solver='heun', rtol=1e-3, atol=1e-3, trace='exact')):
    calls[0] = 0
    flow = solve(counted, z, opts)
    jax.effects_barrier()
    assert int(flow.nfe) == calls[0], opts


def test_rademacher_probes_are_exact_for_a_diagonal_jacobian():
  """vᵀJv = tr J when J is diagonal and v_i² = 1: no Monte-Carlo error at all."""
  z = data_latents(OPTS.t_eps)
  opts = ode.Options(trace='hutchinson', probe='rademacher', num_probes=3)
  probes = ode.draw_probes(jax.random.key(1), z.shape, 3, 'rademacher')
  hutch = solve(gaussian_eps, z, opts, probes=probes).delta_logp
  exact = solve(gaussian_eps, z, OPTS).delta_logp
  np.testing.assert_allclose(hutch, jnp.broadcast_to(exact, hutch.shape), rtol=1e-4)


@pytest.fixture(scope='module')
def tiny_network():
  """A small random VDM network on 4×4 images (perturbed: a fresh one is ε̂ = z)."""
  model, variables = common.init_model(common.tiny_model_config(), shape=(3, 4, 4, 1))
  params = common.perturb(variables['params'], jax.random.key(3), scale=0.3,
                          predicate=lambda name: 'score_model' in name)
  eps_fn, _ = ode.model_functions(model, params, jnp.zeros((3,)))
  z = jax.random.normal(jax.random.key(4), (3, 4, 4, 1))
  return eps_fn, z


@pytest.mark.parametrize('probe', ode.PROBES)
def test_hutchinson_agrees_with_the_exact_trace(tiny_network, probe):
  """The mean over K probes is within 4 of its standard errors of the exact integral."""
  eps_fn, z = tiny_network
  k = 16
  exact = solve(eps_fn, z, NET_OPTS).delta_logp[:, 0]
  probes = ode.draw_probes(jax.random.key(5), z.shape, k, probe)
  opts = dataclasses.replace(NET_OPTS, trace='hutchinson', probe=probe, num_probes=k)
  est = np.asarray(solve(eps_fn, z, opts, probes=probes).delta_logp)
  stderr = est.std(axis=1, ddof=1) / math.sqrt(k)
  assert np.all(stderr > 1e-3)  # the network's Jacobian is not diagonal
  assert np.all(np.abs(est.mean(axis=1) - np.asarray(exact)) < 4 * stderr)


def test_forward_then_backward_returns_the_start():
  """z(ε) → z(1) → z(ε): back to the start, and the two divergence integrals cancel.

  The Gaussian flow is affine, with every direction stretched by √(v_1/v_ε) ≈ 3.3, so
  the solver's error (≈ tol) is amplified little on the way back.
  """
  z = data_latents(OPTS.t_eps)
  forward = solve(gaussian_eps, z, OPTS)
  back = solve(gaussian_eps, forward.z, OPTS, t0=1.0, t1=OPTS.t_eps)
  assert bool(forward.ok) and bool(back.ok)
  assert float(jnp.max(jnp.abs(forward.z - z))) > 0.1  # the flow moved
  np.testing.assert_allclose(back.z, z, atol=100 * OPTS.atol)
  np.testing.assert_allclose(back.delta_logp, -forward.delta_logp, rtol=100 * OPTS.rtol)


@pytest.mark.slow
def test_forward_then_backward_returns_the_start_with_a_network():
  """The same through a (mildly perturbed) network, at tolerance 1e-5.

  The controller bounds each image's RMS error, so single entries may err by up to
  √D = 4 times as much, and the way back amplifies the way out's errors; at tolerance
  1e-4 the largest entry error was 0.024, so 1e-5 must bring it under 0.01 (it did:
  the error follows the tolerance). The divergence integrals (≈ ±6 to ±9 nats) then
  agreed to 0.05 nats.
  """
  opts = dataclasses.replace(NET_OPTS, rtol=1e-5, atol=1e-5)
  model, variables = common.init_model(common.tiny_model_config(), shape=(3, 4, 4, 1))
  params = common.perturb(variables['params'], jax.random.key(3), scale=0.05,
                          predicate=lambda name: 'score_model' in name)
  eps_fn, _ = ode.model_functions(model, params, jnp.zeros((3,)))
  z = jax.random.normal(jax.random.key(4), (3, 4, 4, 1))
  forward = solve(eps_fn, z, opts)
  back = solve(eps_fn, forward.z, opts, t0=1.0, t1=opts.t_eps)
  assert bool(forward.ok) and bool(back.ok)
  assert float(jnp.max(jnp.abs(forward.z - z))) > 0.5  # the flow moved
  np.testing.assert_allclose(back.z, z, atol=1e-2)
  np.testing.assert_allclose(back.delta_logp, -forward.delta_logp, atol=0.1)


def test_fixed_steps_converge_to_the_adaptive_solution():
  """Tsit5 is of order 5: halving the step divides the error by ≈ 32 until float32."""
  z = data_latents(OPTS.t_eps)
  reference = solve(gaussian_eps, z, OPTS).delta_logp
  errors = []
  for n in (4, 8, 16, 64):
    opts = ode.Options(solver='tsit5', num_steps=n, trace='exact')
    errors.append(float(jnp.max(jnp.abs(solve(gaussian_eps, z, opts).delta_logp - reference))))
  assert errors[0] > 8 * errors[1] > 64 * errors[2]
  assert errors[3] < 1e-3


# ------------------------------------------------------------------ dequantisation
V = 4


def model_density(t_eps):
  """p_ε = N(m, c) per coordinate: N(0, I) pushed back through the affine flow."""
  alpha_e, v_e = alpha_and_variance(t_eps)
  alpha_1, v_1 = alpha_and_variance(1.0)
  scale = jnp.sqrt(v_e / v_1)
  return alpha_e * MU - scale * alpha_1 * MU, scale**2


def _discrete_nll(x, t_eps):
  """−log P(x) = −Σ log(Φ((hi − m)/√c) − Φ((lo − m)/√c)), bins α_ε·(f ± 1/V)."""
  m, c = (np.asarray(a, np.float64) for a in model_density(t_eps))
  alpha = float(alpha_and_variance(t_eps)[0])
  f = 2 * (x + 0.5) / V - 1
  lo, hi = alpha * (f - 1 / V), alpha * (f + 1 / V)
  mass = special.ndtr((hi - m) / np.sqrt(c)) - special.ndtr((lo - m) / np.sqrt(c))
  return -np.log(mass).sum(axis=(1, 2, 3))


def _expected_bounds(x, t_eps):
  """E_q[−log p_ε(z) + log q(z|x)] in closed form for both dequantisations."""
  m, c = (np.asarray(a, np.float64) for a in model_density(t_eps))
  g = float(gamma_fn(t_eps))
  alpha, sigma = math.sqrt(special.expit(-g)), math.sqrt(special.expit(g))
  f = 2 * (x + 0.5) / V - 1
  w = 2 * alpha / V
  nlp = lambda second_moment: np.sum(
      0.5 * np.log(2 * np.pi * c) + second_moment / (2 * c), axis=(1, 2, 3))
  uniform = nlp((alpha * f - m) ** 2 + w**2 / 12) - D * math.log(w)
  tau = alpha / (V * sigma)
  mass = special.erf(tau / math.sqrt(2))
  xi2 = 1 - 2 * tau * math.exp(-tau**2 / 2) / math.sqrt(2 * math.pi) / mass  # E ξ²
  truncated = (nlp((alpha * f - m) ** 2 + sigma**2 * xi2)
               - D * (0.5 * xi2 + 0.5 * math.log(2 * math.pi) + math.log(sigma) + math.log(mass)))
  return {'uniform': uniform, 'truncated_normal': truncated}


@pytest.mark.parametrize('t_eps', [1e-5, 0.5])
def test_dequantised_bounds_match_their_expectation_and_bound_the_discrete_nll(t_eps):
  """Both bounds ≥ −log P(x) exactly; the ODE's estimates average to them (4 stderr).

  At t_eps = 0.5, σ_ε is near the bin width, so the truncation is active (τ ≈ 0.4).
  """
  n = 64
  x = np.random.default_rng(0).integers(0, V, (n,) + SHAPE[1:])
  exact = _discrete_nll(x, t_eps)
  expected = _expected_bounds(x, t_eps)
  for kind, bound in expected.items():
    assert np.all(bound >= exact), kind
    opts = ode.Options(trace='exact', dequantisation=kind, t_eps=t_eps)
    nats, _ = jax.jit(lambda x, k: ode.nll(gaussian_eps, gamma_fn, x, V, opts, k))(
        jnp.asarray(x), jax.random.key(6))
    diff = np.asarray(nats[:, 0], np.float64) - bound
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / math.sqrt(n) + 1e-2, kind


# ------------------------------------------------------------------ importance weighting
IW_T_EPS = 0.6  # σ_ε near the bin width (τ ≈ 0.8): one draw's gap ≈ 2 nats, not ≈ 80


@pytest.fixture(scope='module')
def truncated_normal_draws():
  """(x [32, 4, 4, 1], one-draw bounds [32, 256] in nats): each image tiled 256 times
  and dequantised afresh in one solve of the Gaussian data's exact flow."""
  n, k = 32, 256
  x = np.random.default_rng(1).integers(0, V, (n,) + SHAPE[1:])
  opts = ode.Options(trace='exact', dequantisation='truncated_normal', t_eps=IW_T_EPS)
  tiled = jnp.repeat(jnp.asarray(x), k, axis=0)
  nats, flow = jax.jit(lambda x, key: ode.nll(gaussian_eps, gamma_fn, x, V, opts, key))(
      tiled, jax.random.key(7))
  assert bool(flow.ok)
  return x, np.asarray(nats[:, 0], np.float64).reshape(n, k)


def test_importance_weighting_is_below_the_mean_of_its_draws(truncated_normal_draws):
  """Jensen: −log mean exp(−b) ≤ mean b, strictly when the draws differ; equal when the
  K draws coincide."""
  _, draws = truncated_normal_draws
  for k in (2, 4, 16):
    iw = ode.importance_weighted(draws[:, :k])
    assert np.all(iw < draws[:, :k].mean(axis=1))
  same = np.repeat(draws[:, :1], 4, axis=1)
  np.testing.assert_allclose(ode.importance_weighted(same), draws[:, 0], rtol=1e-12)


def test_importance_weighting_converges_to_the_exact_likelihood(truncated_normal_draws):
  """With K draws the bound's excess over −log P(x) (closed form) falls like 1/K: at
  K = 256 it is the delta method's Var(w)/(2K·E[w]²) (w = p/q, estimated from the draws)
  within 4 standard errors, where one draw is ≈ 2 nats above."""
  x, draws = truncated_normal_draws
  exact = _discrete_nll(x, IW_T_EPS)
  one_draw = draws.mean(axis=1) - exact
  assert one_draw.mean() > 1.0
  k = draws.shape[1]
  excess = ode.importance_weighted(draws) - exact
  w = np.exp(-(draws - draws.min(axis=1, keepdims=True)))
  bias = w.var(axis=1) / (2 * k * w.mean(axis=1) ** 2)
  stderr = (excess - bias).std(ddof=1) / math.sqrt(len(x))
  assert abs((excess - bias).mean()) < 4 * stderr + 1e-3
  assert excess.mean() < one_draw.mean() / 10


# ------------------------------------------------------------------ evaluation
def _eval_config():
  config = common.load_config('test')
  config.eval.num_examples = 6
  config.eval.batch_size = 4
  config.eval.num_draws = 2
  config.ode.trace = 'exact'
  config.ode.rtol = config.ode.atol = 1e-3
  return config


@pytest.mark.slow
def test_evaluate_reports_bpd_nfe_and_the_importance_weighted_bound():
  from vdm_jax.runtime import parallel  # pylint: disable=g-import-not-at-top
  from vdm_jax.model import vdm
  config = _eval_config()
  model = vdm.VDM.from_config(config.model)
  _, variables = common.init_model(config.model, shape=(2, 8, 8, 1))
  results = ode.evaluate(model, variables['params'], config, parallel.make_mesh())
  assert results['num_examples'] == 6 and results['estimator'] == 'ode'
  assert results['nfe'] >= 7 and results['seconds_per_image'] > 0
  assert 0 < results['bpd_mc_stderr'] < results['bpd_stderr'] < 1
  # log-mean-exp ≥ mean of logs (Jensen): the weighted bound is the tighter one.
  assert results['bpd_iw'] <= results['bpd'] + 1e-9
  assert 0 < results['bpd_iw_stderr'] < 1
  json.dumps(results)


_LOCKSTEP = '''
import json, jax, numpy as np, common
from vdm_jax.evaluation import ode
from vdm_jax.model import vdm
from vdm_jax.runtime import parallel
from test_ode import _eval_config
config = _eval_config()
config.eval.batch_size = 8
config.eval.num_draws = 1
config.ode.trace = 'hutchinson'
config.ode.rtol = config.ode.atol = 1e-2
model = vdm.VDM.from_config(config.model)
_, variables = common.init_model(config.model, shape=(2, 8, 8, 1))
out = {}
for n in (1, 8):
  mesh = parallel.make_mesh(jax.devices()[:n])
  r = ode.evaluate(model, variables['params'], config, mesh)
  out[n] = [r['bpd'], r['nfe']]
print('RESULT' + json.dumps(out))
'''


@pytest.mark.slow
def test_eight_devices_take_the_same_steps_as_one():
  """One ODE for the global batch: same NFE and bpd on 1 and 8 devices."""
  proc = common.run_python(_LOCKSTEP, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1][6:])
  assert out['8'][1] == out['1'][1]
  assert out['8'][0] == pytest.approx(out['1'][0], rel=1e-4)


@pytest.mark.slow
def test_benchmark_times_the_ode_evaluator():
  benchmark = common.load_experiment('benchmark.py')
  config = common.load_config('test')
  r = benchmark.bench_ode(config, batch=2, repeats=1, num_steps=2)
  assert r['nfe'] == 1 + 6 * 2  # Dormand–Prince: 6 new stages a step, plus the first
  assert r['images_per_s'] == pytest.approx(2 / r['seconds_per_batch'])
  assert r['evaluations_per_s'] == pytest.approx(r['nfe'] * r['images_per_s'])
