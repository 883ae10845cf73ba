"""The bound (docs/maths.md §3.1–§3.6), §4 variance gradients, §5 weighting, §7 sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import common
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.runtime import compiler


def _images(key, shape=(4, 8, 8, 1), vocab=256):
  return jax.random.randint(key, shape, 0, vocab).astype(jnp.uint8)


def _score_fn(model, params):
  return lambda z, g: model.apply({'params': params}, z, g, jnp.zeros((z.shape[0],)),
                                  method=model.score)


def _trained_like(model_cfg, shape=(4, 8, 8, 1), seed=0):
  """A model whose network computes something (zero-init layers perturbed)."""
  model, variables = common.init_model(model_cfg, shape, seed)
  params = common.perturb(variables['params'], jax.random.key(seed + 100), scale=0.1,
                          predicate=lambda p: p.startswith('score_model'))
  return model, params


def test_api_returns_per_example_terms_and_bpd():
  cfg = common.tiny_model_config(vocab_size=256)
  model, variables = common.init_model(cfg)
  x = _images(jax.random.key(1))
  out = model.apply(variables, x, jnp.zeros((4,)), deterministic=False,
                    rngs={'sample': jax.random.key(2), 'dropout': jax.random.key(3)})
  for term in (out.loss_recon, out.loss_klz, out.loss_diff, out.bpd):
    assert term.shape == (4,) and bool(jnp.all(jnp.isfinite(term)))
  total = out.loss_recon + out.loss_klz + out.loss_diff
  np.testing.assert_allclose(out.bpd, total / (64 * math.log(2)), rtol=1e-6)
  np.testing.assert_allclose(out.objective, total, rtol=1e-6)  # elbo weighting


def test_antithetic_times_are_stratified_over_the_batch():
  t = np.sort(np.asarray(time_sampling.stratified_uniforms(jax.random.key(0), 16)))
  np.testing.assert_allclose(np.diff(t), 1 / 16, atol=1e-6)
  assert 0 <= t[0] < 1 / 16


def test_property1_discrete_bound_tends_to_continuous():
  """§3.1: same (x, ε, t) and network: L_T − L_∞ = O(1/T); here t on the grid of every T."""
  cfg = common.tiny_model_config(schedule='fixed_linear')
  model, params = _trained_like(cfg)
  score = _score_fn(model, params)
  gamma = lambda t: cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * t
  f = vdm.encode(_images(jax.random.key(1)), 256)
  eps = jax.random.normal(jax.random.key(2), f.shape)
  t = jnp.array([0.2, 0.4, 0.6, 0.8])  # on the grid of every T below
  g_t = gamma(t)[:, None, None, None]
  z_t = jnp.sqrt(jax.nn.sigmoid(-g_t)) * f + jnp.sqrt(jax.nn.sigmoid(g_t)) * eps
  eps_hat = score(z_t, gamma(t))
  l_inf = vdm.diffusion_loss_continuous(cfg.gamma_max - cfg.gamma_min, eps, eps_hat)
  delta = cfg.gamma_max - cfg.gamma_min
  gaps = {}
  for T in (10, 100, 1000):
    l_T = vdm.diffusion_loss_discrete(gamma(t), gamma(t - 1 / T), T, eps, eps_hat)
    gaps[T] = np.asarray(l_T / l_inf - 1)
    # For a linear γ the ratio is exactly T·expm1(Δ/T)/Δ = 1 + Δ/(2T) + O(T⁻²); float32
    # γ differences (|γ| ~ 10, ulp ~ 1e-6) limit the ratio to ~1e-6·T/Δ·|γ| ~ 5e-4.
    exact = T * math.expm1(delta / T) / delta - 1
    np.testing.assert_allclose(gaps[T], exact, atol=1e-3)
  # O(1/T): each tenfold T cuts the gap tenfold (up to the O(T⁻²) term).
  np.testing.assert_allclose(gaps[100] / gaps[1000], 10, rtol=0.1)
  np.testing.assert_allclose(gaps[1000] * 1000, delta / 2, rtol=0.05)


def test_property2_epsilon_and_data_space_forms_agree():
  cfg = common.tiny_model_config()
  model, params = _trained_like(cfg)
  score = _score_fn(model, params)
  f = vdm.encode(_images(jax.random.key(1)), 256)
  eps = jax.random.normal(jax.random.key(2), f.shape)
  T = 50
  t = jnp.array([0.1, 0.3, 0.62, 0.9])
  gam = lambda t: model.apply({'params': params}, t, method=lambda m, t: m.gamma(t))
  g_t, g_s = gam(t), gam(t - 1 / T)
  gb = g_t[:, None, None, None]
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(-gb)), jnp.sqrt(jax.nn.sigmoid(gb))
  z_t = alpha * f + sigma * eps
  eps_hat = score(z_t, g_t)
  x_hat = (z_t - sigma * eps_hat) / alpha
  a = vdm.diffusion_loss_discrete(g_t, g_s, T, eps, eps_hat)
  # Data space: ½·T·(SNR(s) − SNR(t))·‖f − x̂‖² (docs/maths.md §3d).
  b = 0.5 * T * (jnp.exp(-g_s) - jnp.exp(-g_t)) * vdm.sum_except_batch(jnp.square(f - x_hat))
  # float32: x̂ divides by α_t ≥ 0.08 and subtracts nearly equal terms: ~1e-5 relative.
  np.testing.assert_allclose(a, b, rtol=1e-4)


def _diffusion_draws(model, params, x, n_draws, seed=0):
  """n_draws independent single-example draws of L_∞ for the batch x (one per row)."""
  fn = jax.jit(lambda key: model.apply(
      {'params': params}, x, jnp.zeros((x.shape[0],)), rngs={'sample': key}).loss_diff)
  keys = jax.random.split(jax.random.key(seed), n_draws)
  return np.concatenate([np.asarray(fn(k)) for k in keys])


def test_property3_mean_depends_only_on_endpoints():
  """§3.3: linear and bent pinned schedules, same endpoints: equal means, unequal variances."""
  base = dict(time_sampling='uniform')
  linear_cfg = common.tiny_model_config(schedule='fixed_linear', **base)
  bent_cfg = common.tiny_model_config(schedule='learned_nnet',
                                      schedule_endpoints='pinned', **base)
  lin_model, lin_params = _trained_like(linear_cfg, shape=(256, 4, 4, 1))
  bent_model, bent_vars = common.init_model(bent_cfg, shape=(256, 4, 4, 1))
  bent_params = dict(bent_vars['params'])
  bent_params['score_model'] = lin_params['score_model']  # the same network θ
  bent_params['gamma'] = common.bend_nnet_schedule(bent_params['gamma'], jax.random.key(7))
  x = jnp.broadcast_to(_images(jax.random.key(3), (1, 4, 4, 1)), (256, 4, 4, 1))
  a = _diffusion_draws(lin_model, lin_params, x, 24)
  b = _diffusion_draws(bent_model, bent_params, x, 24, seed=1)
  se = math.sqrt(a.var() / a.size + b.var() / b.size)
  assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
  # The shape changes the variance: by much more than sampling error (~2/sqrt(n)).
  ratio = b.var() / a.var()
  assert abs(math.log(ratio)) > 0.3, ratio


def test_property4_prior_kl_matches_monte_carlo():
  f = vdm.encode(_images(jax.random.key(1), (1, 4, 4, 1)), 256)
  gamma_1 = jnp.float32(-1.0)  # a large α_1 so that the KL is far from 0
  kl = float(vdm.prior_loss(f, gamma_1)[0])
  n = 200_000
  alpha, sigma = math.sqrt(jax.nn.sigmoid(-gamma_1)), math.sqrt(jax.nn.sigmoid(gamma_1))
  z = alpha * f + sigma * jax.random.normal(jax.random.key(2), (n,) + f.shape[1:])
  log_q = -0.5 * jnp.sum(((z - alpha * f) / sigma) ** 2 + 2 * jnp.log(sigma), axis=(1, 2, 3))
  log_p = -0.5 * jnp.sum(z ** 2, axis=(1, 2, 3))  # the 2π terms cancel
  est = np.asarray(log_q - log_p)
  assert abs(est.mean() - kl) < 4 * est.std() / math.sqrt(n), (est.mean(), kl)


def _prior_reference(x, gamma_1):
  """½ Σ_i (α² f_i² + σ² − log σ² − 1) in float64, with σ² − log σ² − 1 = −log(1 − α²) − α²."""
  f = 2.0 * (x.astype(np.float64) + 0.5) / 256 - 1.0
  a = 1.0 / (1.0 + np.exp(np.float64(gamma_1)))
  sum_f2 = np.sum(f.reshape(len(f), -1) ** 2, axis=1)
  value = 0.5 * (a * sum_f2 + f[0].size * (-np.log1p(-a) - a))
  grad = 0.5 * (-a * (1.0 - a) * sum_f2 - f[0].size * a * a)  # dα²/dγ = −α²σ², d(…)/dγ = −α⁴
  return value, grad


def test_prior_matches_float64_across_gamma_and_images():
  """Full float32 precision for γ_1 ∈ [−15, 15], flat to extreme images (1e-6 relative)."""
  shape = (32, 32, 3)
  checker = (np.indices(shape).sum(0) % 2 * 255).astype(np.uint8)
  images = np.stack([np.full(shape, 127, np.uint8), np.full(shape, 128, np.uint8),
                     np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8), checker,
                     np.random.default_rng(0).integers(0, 256, shape, np.uint8)])
  f = vdm.encode(jnp.asarray(images), 256)
  prior = lambda g: vdm.prior_loss(f, g)
  value_and_grad = jax.jit(jax.vmap(lambda g: (prior(g), jax.jacrev(prior)(g)), out_axes=1))
  gammas = np.linspace(-15.0, 15.0, 241).astype(np.float32)
  got, got_grad = (np.asarray(v, np.float64) for v in value_and_grad(jnp.asarray(gammas)))
  for i, gamma_1 in enumerate(gammas):
    want, want_grad = _prior_reference(images, gamma_1)
    np.testing.assert_allclose(got[:, i], want, rtol=1e-6, err_msg=f'γ_1 = {gamma_1}')
    np.testing.assert_allclose(got_grad[:, i], want_grad, rtol=1e-5, err_msg=f'γ_1 = {gamma_1}')


@pytest.mark.parametrize('vocab', [2, 17, 256])
def test_property5_decoder_normalised_and_exact_at_low_noise(vocab):
  u = jax.random.normal(jax.random.key(0), (3, 5))
  p = jax.nn.softmax(vdm.decoder_logits(u, jnp.float32(-3.0), vocab), axis=-1)
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  x = _images(jax.random.key(1), (4, 6, 6, 2), vocab)
  f = vdm.encode(x, vocab)
  eps0 = jax.random.normal(jax.random.key(2), f.shape)
  loss = vdm.reconstruction_loss(x, f, eps0, jnp.float32(-30.0), vocab)
  # Noise std e^-15 ≈ 3e-7 against a bin half-width 1/V: every sub-pixel decodes exactly.
  assert float(loss.max()) < 1e-5
  assert float(vdm.reconstruction_loss(x, f, eps0, jnp.float32(0.0), vocab).min()) > 1.0


def _textbook_log_prob(x, u, gamma_0, vocab):
  """log p(x | z_0) as §3 writes it: log_softmax of the V logits, then the x-th."""
  log_p = jax.nn.log_softmax(vdm.decoder_logits(u, gamma_0, vocab), axis=-1)
  return jnp.take_along_axis(log_p, jnp.round(x).astype(jnp.int32)[..., None], -1)[..., 0]


@pytest.mark.parametrize('vocab', [2, 17, 256])
def test_decoder_log_prob_equals_the_textbook_softmax(vocab):
  """The fused form (one reduction, relative to the nearest bin) equals log_softmax in
  value and in its gradients w.r.t. γ_0 (through u too, as in L_recon) and u, to
  float32 rounding, from a sharp decoder (γ_0 = −13.3) to a flat one (γ_0 = 3), with u
  also outside [−1, 1]."""
  x = jax.random.randint(jax.random.key(0), (300,), 0, vocab).astype(jnp.float32)
  f = vdm.encode(x, vocab)
  eps0 = jax.random.normal(jax.random.key(1), f.shape)
  u_far = jnp.array([-1.7, -1.01, 1.01, 1.6])
  for gamma_0 in (-13.3, -8.0, -3.0, 0.0, 3.0):
    g = jnp.float32(gamma_0)
    def total(fn, g):
      return jnp.sum(fn(x, f + jnp.exp(0.5 * g) * eps0, g, vocab))
    np.testing.assert_allclose(total(vdm.decoder_log_prob, g), total(_textbook_log_prob, g),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(jax.grad(total, 1)(vdm.decoder_log_prob, g),
                               jax.grad(total, 1)(_textbook_log_prob, g), rtol=1e-4, atol=1e-3)
    u = jnp.concatenate([f + jnp.exp(0.5 * g) * eps0, u_far])
    xs = jnp.concatenate([x, jnp.array([0.0, 0.0, vocab - 1.0, 0.0])])
    per_u = lambda fn: jax.grad(lambda u: jnp.sum(fn(xs, u, g, vocab)))(u)
    np.testing.assert_allclose(vdm.decoder_log_prob(xs, u, g, vocab),
                               _textbook_log_prob(xs, u, g, vocab), rtol=1e-5, atol=1e-5)
    scale = float(jnp.max(jnp.abs(per_u(_textbook_log_prob))))
    np.testing.assert_allclose(per_u(vdm.decoder_log_prob), per_u(_textbook_log_prob),
                               rtol=1e-4, atol=1e-5 * scale)


def test_decoder_gradient_stores_no_vocabulary_sized_array():
  """Differentiating L_recon w.r.t. γ_0 keeps [P] residuals, not the P·V softmax that
  autodiff of a log_softmax stores (its compiled temp memory is P·V floats), under the
  model's compiler options (split into separate elementwise library calls on CPU, the
  normaliser stored four [P, V] arrays)."""
  pixels, vocab = 4096, 256
  x = jnp.zeros((pixels,))
  f = vdm.encode(x, vocab)
  eps0 = jax.random.normal(jax.random.key(0), f.shape)
  def temp(fn):
    grad = jax.jit(jax.grad(lambda g: jnp.sum(fn(x, f + jnp.exp(0.5 * g) * eps0, g, vocab))),
                   compiler_options=compiler.compiler_options())  # as the model compiles
    return grad.lower(jnp.float32(-5.0)).compile().memory_analysis().temp_size_in_bytes
  assert temp(_textbook_log_prob) >= pixels * vocab * 4  # the stored softmax
  assert temp(vdm.decoder_log_prob) < pixels * vocab * 4 / 16


def test_discrete_time_runs_and_stays_on_the_grid():
  cfg = common.tiny_model_config(timesteps=10)
  model, variables = common.init_model(cfg)
  out = model.apply(variables, _images(jax.random.key(1)), jnp.zeros((4,)),
                    rngs={'sample': jax.random.key(2)})
  np.testing.assert_allclose(np.asarray(out.t) * 10, np.round(np.asarray(out.t) * 10),
                             atol=1e-5)
  assert float(out.t.min()) >= 0.1 - 1e-6
  out2 = model.apply(variables, _images(jax.random.key(1)), jnp.zeros((4,)),
                     rngs={'sample': jax.random.key(2)}, timesteps=0)
  assert not np.allclose(out.loss_diff, out2.loss_diff)


@pytest.mark.parametrize('name', ['sigmoid', 'elbo_plus_sigmoid'])
def test_sigmoid_weightings_change_only_the_objective(name):
  cfg = common.tiny_model_config(weighting=name, sigmoid_bias=2.0, sigmoid_scale=7.0)
  model, params = _trained_like(cfg)
  out = model.apply({'params': params}, _images(jax.random.key(1)), jnp.zeros((4,)),
                    rngs={'sample': jax.random.key(2)})
  # w(λ) with λ = −γ_t: sigmoid(2 − λ), or 1 + 7·sigmoid(2 − λ).
  w = jax.nn.sigmoid(2.0 + model.apply({'params': params}, out.t,
                                       method=lambda m, t: m.gamma(t)))
  if name == 'elbo_plus_sigmoid':
    w = 1.0 + 7.0 * w
  np.testing.assert_allclose(out.loss_diff_weighted, w * out.loss_diff, rtol=1e-5)
  np.testing.assert_allclose(out.objective,
                             out.loss_recon + out.loss_klz + w * out.loss_diff, rtol=1e-5)
  total = out.loss_recon + out.loss_klz + out.loss_diff
  np.testing.assert_allclose(out.bpd, total / (64 * math.log(2)), rtol=1e-5)
  with pytest.raises(ValueError, match="weighting must be one of"):
    vdm.weighting('cosine', jnp.zeros(2))


@pytest.mark.slow  # compiles the gradients of the whole model (~10 s each)
@pytest.mark.parametrize('timesteps', [0, 20])
def test_variance_gradient_is_the_gradient_of_the_mean_square(timesteps):
  """§4: shape parameters get ∂ mean(L²), endpoints and θ get ∂ mean(bound)."""
  kw = dict(schedule='learned_nnet', schedule_endpoints='pinned', timesteps=timesteps)
  vr_cfg = common.tiny_model_config(schedule_variance_reduction=True, **kw)
  plain_cfg = common.tiny_model_config(**kw)
  vr_model, variables = common.init_model(vr_cfg)
  plain_model = vdm.VDM.from_config(plain_cfg)
  params = common.perturb(variables['params'], jax.random.key(5), scale=0.1,
                          predicate=lambda p: p.startswith('score_model'))
  params['gamma'] = common.bend_nnet_schedule(params['gamma'], jax.random.key(6), 2.0)
  x, cond = _images(jax.random.key(1)), jnp.zeros((4,))
  rng = {'sample': jax.random.key(2), 'dropout': jax.random.key(3)}

  def run(model, p):
    return model.apply({'params': p}, x, cond, deterministic=False, rngs=rng)

  def vr_grad(p):
    objective = run(vr_model, p).objective
    return objective.mean(), objective
  def plain_grads(p):  # one forward pass, the gradients of its two means
    def means(q):
      out = run(plain_model, q)
      return (out.objective.mean(), jnp.mean(out.loss_diff ** 2)), out.objective
    (bound, square), vjp, objective = jax.vjp(means, p, has_aux=True)
    one, zero = jnp.ones_like(bound), jnp.zeros_like(square)
    return objective, vjp((one, zero))[0], vjp((zero, one))[0]

  # Compiled: op by op, the three gradients take ~10x longer on a CPU.
  (_, vr_objective), g_vr = jax.jit(jax.value_and_grad(vr_grad, has_aux=True))(params)
  objective, g_bound, g_square = jax.jit(plain_grads)(params)
  np.testing.assert_allclose(vr_objective, objective, rtol=1e-6)
  def close(a, b):  # float32 sums of per-pixel terms: relative 2e-4 of the tree's scale
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(b))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-4, atol=1e-5 * scale),
                 a, b)
  for layer in ('l1', 'l2', 'l3'):
    close(g_vr['gamma'][layer], g_square['gamma'][layer])
    # …and that is not what the bound would give.
    assert not np.allclose(g_vr['gamma'][layer]['kernel'], g_bound['gamma'][layer]['kernel'])
  for name in ('gamma_0', 'gamma_1'):
    close(g_vr['gamma'][name], g_bound['gamma'][name])
  close(g_vr['score_model'], g_bound['score_model'])


def test_sampler_is_deterministic_and_returns_valid_integers():
  cfg = common.tiny_model_config(vocab_size=17)
  model, params = _trained_like(cfg)
  sample = jax.jit(lambda key: model.apply(
      {'params': params}, key, (3, 8, 8, 1), timesteps=8, method=model.sample))
  a, b = sample(jax.random.key(4)), sample(jax.random.key(4))
  c = sample(jax.random.key(5))
  assert a.shape == (3, 8, 8, 1) and a.dtype == jnp.int32
  assert int(a.min()) >= 0 and int(a.max()) < 17
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  drawn = model.apply({'params': params}, jax.random.key(4), (3, 8, 8, 1), timesteps=8,
                      decode='draw', method=model.sample)
  assert int(drawn.min()) >= 0 and int(drawn.max()) < 17


def test_sample_step_matches_the_posterior_formula():
  """§7: z_s = α_s/α_t·(z_t − σ_t c ε̂) + σ_s √c ε_i with c = −expm1(γ_s − γ_t)."""
  cfg = common.tiny_model_config(schedule='fixed_linear')
  model, params = _trained_like(cfg)
  T, i = 10, 3
  z_t = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  cond = jnp.zeros((2,))
  got = model.apply({'params': params}, i, T, z_t, cond, jax.random.key(9),
                    method=model.sample_step)
  gamma = lambda t: cfg.gamma_min + (cfg.gamma_max - cfg.gamma_min) * t
  g_t, g_s = gamma(0.7), gamma(0.6)
  eps_hat = _score_fn(model, params)(z_t, jnp.full((2,), g_t))
  # Posterior q(z_s | z_t, x = x̂) in its textbook form (Kingma et al. 2021, eq. 28).
  a2 = lambda g: 1 / (1 + math.exp(g))
  s2 = lambda g: 1 / (1 + math.exp(-g))
  x_hat = (z_t - math.sqrt(s2(g_t)) * eps_hat) / math.sqrt(a2(g_t))
  alpha_ts = math.sqrt(a2(g_t) / a2(g_s))
  sigma2_ts = s2(g_t) - alpha_ts ** 2 * s2(g_s)
  mean = (alpha_ts * s2(g_s) / s2(g_t)) * z_t + (math.sqrt(a2(g_s)) * sigma2_ts / s2(g_t)) * x_hat
  var = sigma2_ts * s2(g_s) / s2(g_t)
  noise = jax.random.normal(jax.random.fold_in(jax.random.key(9), i), z_t.shape)
  np.testing.assert_allclose(got, mean + math.sqrt(var) * noise, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # trains a model for 600 steps
def test_property6_bound_above_entropy_and_training_approaches_it():
  """§3.6: two fixed binary 4×4 images, V = 2: H = 1 bit per image = 1/16 bpd."""
  # γ ∈ [−6, 6] at the start: two bins at ±½ need no more SNR than that, and a
  # few hundred steps suffice (from −13.3 the schedule would first have to travel).
  cfg = common.tiny_model_config(vocab_size=2, n_embd=16, with_fourier_features=False,
                                 gamma_min=-6.0, gamma_max=6.0, p_drop=0.0)
  entropy_bpd = 1.0 / 16
  images = np.zeros((2, 4, 4, 1), np.uint8)
  images[0, :2] = 1
  images[1, :, :2] = 1
  batch = 64
  model, variables = common.init_model(cfg, shape=(batch, 4, 4, 1))
  tx = optax.adam(3e-3)
  params, opt_state = variables['params'], tx.init(variables['params'])
  cond = jnp.zeros((batch,))

  @jax.jit
  def step(params, opt_state, key):
    k1, k2, k3 = jax.random.split(key, 3)
    x = jnp.asarray(images)[jax.random.randint(k1, (batch,), 0, 2)]
    loss_fn = lambda p: model.apply({'params': p}, x, cond, deterministic=False,
                                    rngs={'sample': k2, 'dropout': k3}).objective.mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def evaluate(params, key):
    x = jnp.asarray(images)[jnp.arange(batch) % 2]
    return model.apply({'params': params}, x, cond, rngs={'sample': key}).bpd

  def estimate(params, n=30):
    draws = np.concatenate([np.asarray(evaluate(params, jax.random.key(1000 + i)))
                            for i in range(n)])
    return draws.mean(), draws.std() / math.sqrt(draws.size)

  key = jax.random.key(0)
  history = []
  for i in range(600):
    params, opt_state = step(params, opt_state, jax.random.fold_in(key, i))
    if i % 150 == 149:
      history.append(estimate(params))
  for mean, se in history:  # a bound: never below H beyond Monte-Carlo error
    assert mean > entropy_bpd - 4 * se, (mean, se)
  final, se = history[-1]
  print(f'final bpd {final:.4f} ± {se:.4f}, entropy {entropy_bpd:.4f}')
  assert final < entropy_bpd + 0.15, history
