"""v-prediction and noise levels drawn from a proposal (docs/maths.md §11)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm

G0, G1 = -13.3, 5.0


def _adaptive_probs(k=16, seed=0):
  """Bin masses far from uniform (a factor ~50 between bins), as a trained proposal has."""
  logits = 2.0 * jax.random.normal(jax.random.key(seed), (k,))
  return jax.nn.softmax(logits) * 0.95 + 0.05 / k


PROPOSALS = {'sigmoid': None, 'adaptive': _adaptive_probs()}


@pytest.mark.parametrize('name', PROPOSALS)
def test_proposal_density_is_the_derivative_of_its_cdf_and_integrates_to_one(name):
  p = time_sampling.Proposal(jnp.float32(G0), jnp.float32(G1), PROPOSALS[name])
  position = (np.arange(1000) + 0.5) / 1000
  position = position[np.abs(position * 16 - np.round(position * 16)) > 1e-3]  # off the edges
  gamma = jnp.asarray(G0 + (G1 - G0) * position, jnp.float32)
  density = jnp.exp(p.log_density(gamma))
  derivative = jax.vmap(jax.grad(p.cdf))(gamma)
  np.testing.assert_allclose(derivative, density, rtol=2e-4, atol=1e-6)
  assert float(p.cdf(jnp.float32(G0))) == pytest.approx(0.0, abs=1e-6)
  assert float(p.cdf(jnp.float32(G1))) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize('name', PROPOSALS)
def test_inverse_cdf_inverts_the_cdf(name):
  p = time_sampling.Proposal(jnp.float32(G0), jnp.float32(G1), PROPOSALS[name])
  u = jnp.linspace(0.0, 0.999, 1001)
  gamma = p.inverse_cdf(u)
  assert float(gamma.min()) >= np.float32(G0) and float(gamma.max()) <= np.float32(G1)
  assert bool(jnp.all(jnp.diff(gamma) >= 0))
  # F(F⁻¹(u)) = u up to float32 rounding of γ near the noisy end, where F is steep.
  np.testing.assert_allclose(p.cdf(gamma), u, atol=2e-5)


def test_sigmoid_proposal_is_proportional_to_alpha_squared():
  p = time_sampling.Proposal(jnp.float32(G0), jnp.float32(G1))
  gamma = jnp.array([-10.0, -1.0, 0.0, 3.0])
  z = math.log1p(math.exp(-G0)) - math.log1p(math.exp(-G1))  # softplus(−γ_0) − softplus(−γ_1)
  np.testing.assert_allclose(jnp.exp(p.log_density(gamma)), jax.nn.sigmoid(-gamma) / z,
                             rtol=1e-6)


def test_discrete_steps_are_drawn_with_the_proposals_mass_per_step():
  p = time_sampling.Proposal(jnp.float32(G0), jnp.float32(G1))
  grid = jnp.linspace(G0, G1, 11)  # a linear schedule, T = 10
  u = time_sampling.stratified_uniforms(jax.random.key(0), 100_000)
  k, q = p.draw_steps(u, grid)
  assert int(k.min()) == 1 and int(k.max()) == 10
  mass = np.diff(np.asarray(p.cdf(grid)))
  np.testing.assert_allclose(np.bincount(np.asarray(k) - 1, minlength=10) / u.size, mass,
                             atol=2e-5)  # stratified: within 1/B of the mass
  np.testing.assert_allclose(q, mass[np.asarray(k) - 1], rtol=1e-4)


def test_v_and_eps_identities_hold_to_float32_rounding():
  """ε = α_t v + σ_t z_t, and ½‖ε − ε̂‖² = ½α_t²‖v − v̂‖² (11.1, 11.2)."""
  keys = jax.random.split(jax.random.key(0), 4)
  f = jax.random.uniform(keys[0], (6, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(keys[1], f.shape)
  gamma = jnp.linspace(-12.0, 4.0, 6)[:, None, None, None]
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))
  z = alpha * f + sigma * eps
  v = vdm.v_target(f, eps, gamma)
  np.testing.assert_allclose(vdm.eps_from_v(v, z, gamma), eps, atol=1e-5)  # true v: zero loss
  loss = vdm.diffusion_loss_continuous(1.0, eps, vdm.eps_from_v(v, z, gamma))
  assert float(jnp.max(loss)) < 1e-8
  v_hat = v + 0.3 * jax.random.normal(keys[2], f.shape)
  lhs = vdm.sum_except_batch(jnp.square(eps - vdm.eps_from_v(v_hat, z, gamma)))
  rhs = jnp.square(alpha[:, 0, 0, 0]) * vdm.sum_except_batch(jnp.square(v - v_hat))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_a_v_network_gives_eps_hat_through_the_identity():
  """The same parameters as an ε-network (output net + z) and a v-network (output net)."""
  shape = (4, 4, 4, 1)
  model_eps, params = common.init_model(common.tiny_model_config(), shape)
  params = common.perturb(params['params'], jax.random.key(1),
                          predicate=lambda p: p.startswith('score_model'))
  model_v = vdm.VDM.from_config(common.tiny_model_config(prediction='v'))
  z = jax.random.normal(jax.random.key(2), shape)
  g = jnp.array([-10.0, -3.0, 0.0, 4.0])
  cond = jnp.zeros((4,))
  score = lambda m: jax.jit(lambda p: m.apply({'params': p}, z, g, cond,
                                            method=vdm.VDM.score))(params)
  net = score(model_eps) - z
  expected = vdm.eps_from_v(net, z, g[:, None, None, None])
  np.testing.assert_allclose(score(model_v), expected, rtol=1e-5, atol=1e-6)


def _weighted_terms(model, params, x, sampling, bin_probs, draws):
  """Per-example diffusion terms, weighted by each weighting, over `draws` batches."""
  fn = jax.jit(lambda key: model.apply(
      {'params': params}, x, jnp.zeros((x.shape[0],)), sampling=sampling,
      bin_probs=bin_probs, rngs={'sample': key}))
  outs = [fn(k) for k in jax.random.split(jax.random.key(11), draws)]
  loss = np.concatenate([np.asarray(o.loss_diff, np.float64) for o in outs])
  gamma = jnp.concatenate([o.gamma_t for o in outs])
  return {w: loss * np.asarray(vdm.weighting(w, -gamma), np.float64) for w in vdm.WEIGHTINGS}


@pytest.mark.parametrize('timesteps', [0, 10])
def test_every_proposal_is_unbiased_for_every_weighting(timesteps):
  """E[w·½‖ε − ε̂‖²/p(γ)] equals the uniform-t estimate within 4 standard errors (11.3, 11.6)."""
  cfg = common.tiny_model_config(schedule='learned_linear', timesteps=timesteps)
  model, variables = common.init_model(cfg, (512, 4, 4, 1))
  params = common.perturb(variables['params'], jax.random.key(5), scale=0.2,
                          predicate=lambda p: p.startswith('score_model'))
  x = jnp.broadcast_to(jax.random.randint(jax.random.key(3), (1, 4, 4, 1), 0, 256),
                       (512, 4, 4, 1)).astype(jnp.uint8)
  reference = _weighted_terms(model, params, x, 'antithetic', None, 8)
  for name, probs in PROPOSALS.items():
    drawn = _weighted_terms(model, params, x, name, probs, 8)
    for w in vdm.WEIGHTINGS:
      a, b = reference[w], drawn[w]
      se = math.sqrt(a.var() / a.size + b.var() / b.size)
      assert abs(a.mean() - b.mean()) < 4 * se, (name, w, a.mean(), b.mean(), se)


def test_adaptive_state_averages_each_bin_and_its_probabilities_stay_positive():
  state = time_sampling.init_adaptive(4)
  probs = time_sampling.adaptive_probs(state, 0.5, 0.2)
  np.testing.assert_allclose(probs, 0.25, rtol=1e-6)  # no data yet: uniform
  bins = jnp.array([0, 0, 2, 2, 2])
  values = jnp.array([1.0, 3.0, 10.0, 20.0, 30.0])
  state = time_sampling.update_adaptive(state, bins, values, decay=0.5)
  np.testing.assert_allclose(state.mean_loss, [1.0, 0.0, 10.0, 0.0])  # (1 − β)·mean
  np.testing.assert_array_equal(state.updates, [1, 0, 1, 0])
  state = time_sampling.update_adaptive(state, jnp.array([0]), jnp.array([4.0]), decay=0.5)
  np.testing.assert_allclose(state.mean_loss, [2.5, 0.0, 10.0, 0.0])
  probs = np.asarray(time_sampling.adaptive_probs(state, 0.5, 0.2))
  # Bias-corrected: bin 0 → 2.5/(1 − ¼) = 10/3, bin 2 → 20; unseen bins take their mean.
  m = np.array([10 / 3, 70 / 6, 20.0, 70 / 6])
  np.testing.assert_allclose(probs, 0.8 * m / m.sum() + 0.05, rtol=1e-5)
  assert probs.sum() == pytest.approx(1.0, abs=1e-6) and probs.min() >= 0.05
