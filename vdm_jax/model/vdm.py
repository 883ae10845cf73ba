"""The Variational Diffusion Model: encoder, decoder, the three bound terms, sampling.

Kingma, Salimans, Poole, Ho (2021), "Variational Diffusion Models". All losses are per
example, in nats; docs/maths.md §1 (data), §3 (the bound), §4 (low-variance schedule training),
§5 (weighted objectives), §7 (ancestral sampling) and §11 (v-prediction, noise levels drawn
from a proposal).

    model = vdm_jax.VDM.from_config(config.model)
    variables = model.init(rngs, images, conditioning)
    out = model.apply(variables, images, conditioning, deterministic=False,
                      rngs={'sample': k1, 'dropout': k2})
    out.loss_recon, out.loss_klz, out.loss_diff, out.bpd   # each [B]
"""

import math
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax.model import decoder
from vdm_jax.model import multivariate
from vdm_jax.model import networks
from vdm_jax.model import schedules
from vdm_jax.model import second_order
from vdm_jax.model import time_sampling

WEIGHTINGS = ('elbo', 'sigmoid', 'elbo_plus_sigmoid')
PREDICTIONS = ('eps', 'v')


# ------------------------------------------------------------------ §1 encoder/decoder
# The decoder lives in decoder.py; its functions are part of this module's interface.
encode = decoder.encode
decoder_logits = decoder.decoder_logits
nearest_centre = decoder.nearest_centre
decoder_log_normaliser = decoder.decoder_log_normaliser
decoder_log_prob = decoder.decoder_log_prob


# ------------------------------------------------------------------ §3 the bound terms
def sum_except_batch(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _variance_kl(gamma: jax.Array) -> jax.Array:
  """σ² − log σ² − 1 at σ² = sigmoid(γ), to float32 precision for any γ (§3).

  With a = α² = sigmoid(−γ) it equals −log(1 − a) − a = a²/2 + a³/3 + …, which the
  direct form softplus(−γ) − a loses to cancellation once a is small (γ ≳ 0). There,
  with s = a/(2 − a), −log(1 − a) = 2·atanh(s) and a = 2s/(1 + s) give the sum of
  positive terms 2s²/(1 + s) + 2·Σ_{k≥1} s^(2k+1)/(2k+1); s ≤ 0.58 for γ ≥ −1, and
  twelve terms leave a truncation far below float32 rounding.
  """
  a = nn.sigmoid(-gamma)
  s = a / (2.0 - a)
  s2 = jnp.square(s)
  tail = jnp.zeros_like(s)
  for k in range(12, 0, -1):  # Horner: Σ_{k=1}^{12} s^(2k−2)/(2k+1)
    tail = s2 * tail + 1.0 / (2 * k + 1)
  small_a = 2.0 * s2 / (1.0 + s) + 2.0 * s * s2 * tail
  return jnp.where(gamma >= -1.0, small_a, nn.softplus(-gamma) - a)


def prior_loss(f: jax.Array, gamma_1: jax.Array) -> jax.Array:
  """L_prior = KL(q(z_1|x) ‖ N(0, I)) = ½ Σ_i (α_1² f_i² + σ_1² − log σ_1² − 1) (§3).

  The second part is the same for every sub-pixel: ½·(α_1²·Σ_i f_i² + D·(σ_1² − log σ_1² − 1)).
  """
  num_dims = math.prod(f.shape[1:])
  alpha2_1 = nn.sigmoid(-gamma_1)
  return 0.5 * (alpha2_1 * sum_except_batch(jnp.square(f))
                + num_dims * _variance_kl(gamma_1))


def reconstruction_loss(x: jax.Array, f: jax.Array, eps_0: jax.Array,
                        gamma_0: jax.Array, vocab_size: int) -> jax.Array:
  """L_recon = −Σ_i log p(x_i | z_0), u = z_0/α_0 = f + exp(γ_0/2)·ε_0 (§3)."""
  u = f + jnp.exp(0.5 * gamma_0) * eps_0
  return -sum_except_batch(decoder_log_prob(x, u, gamma_0, vocab_size))


def diffusion_loss_continuous(gamma_prime_t: jax.Array, eps: jax.Array,
                              eps_hat: jax.Array) -> jax.Array:
  """L_∞ = ½·γ'(t)·‖ε − ε̂‖² (§3)."""
  return 0.5 * gamma_prime_t * sum_except_batch(jnp.square(eps - eps_hat))


def diffusion_loss_discrete(gamma_t: jax.Array, gamma_s: jax.Array, timesteps: int,
                            eps: jax.Array, eps_hat: jax.Array) -> jax.Array:
  """L_T = ½·T·expm1(γ_t − γ_s)·‖ε − ε̂‖², s = t − 1/T (§3)."""
  return 0.5 * timesteps * jnp.expm1(gamma_t - gamma_s) * sum_except_batch(
      jnp.square(eps - eps_hat))


def diffusion_loss_importance(log_density: jax.Array, eps: jax.Array,
                              eps_hat: jax.Array) -> jax.Array:
  """L_∞ = ½·‖ε − ε̂‖²/p(γ_t), γ_t drawn from the proposal p (11.3)."""
  return 0.5 * jnp.exp(-log_density) * sum_except_batch(jnp.square(eps - eps_hat))


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
  """bpd = nats / (D·ln 2) (§3)."""
  return nats / (num_dims * math.log(2.0))


discretise_times = time_sampling.discretise_times


# ------------------------------------------------------------------ §11 v-prediction
def eps_from_v(v_hat: jax.Array, z_t: jax.Array, gamma_t: jax.Array) -> jax.Array:
  """ε̂ = α_t·v̂ + σ_t·z_t, from a prediction of v = α_t·ε − σ_t·f (11.1)."""
  return jnp.sqrt(nn.sigmoid(-gamma_t)) * v_hat + jnp.sqrt(nn.sigmoid(gamma_t)) * z_t


def v_target(f: jax.Array, eps: jax.Array, gamma_t: jax.Array) -> jax.Array:
  """v = α_t·ε − σ_t·f (11.1)."""
  return jnp.sqrt(nn.sigmoid(-gamma_t)) * eps - jnp.sqrt(nn.sigmoid(gamma_t)) * f


# ------------------------------------------------------------------ §5 weightings
def weighting(name: str, log_snr: jax.Array, sigmoid_bias: float = 2.0,
              sigmoid_scale: float = 20.0) -> jax.Array:
  """w(λ_t) of the weighted objective L_∞(x, w) (§5).

  elbo:              w ≡ 1, the bound itself.
  sigmoid:           w = sigmoid(b − λ) (Kingma & Gao 2023): weight on the noisy end,
                     where the samples' global shape is decided; the nearly clean end,
                     where most of the bits are, is almost untrained.
  elbo_plus_sigmoid: w = 1 + a·sigmoid(b − λ): the bound plus a times the sigmoid
                     objective, so that the noisy end leads early training while every
                     noise level keeps at least the bound's weight.
  All three decrease monotonically in λ, so each is the bound of noise-augmented data
  (Kingma & Gao 2023).
  """
  if name == 'elbo':
    return jnp.ones_like(log_snr)
  if name == 'sigmoid':
    return nn.sigmoid(sigmoid_bias - log_snr)
  if name == 'elbo_plus_sigmoid':
    return 1.0 + sigmoid_scale * nn.sigmoid(sigmoid_bias - log_snr)
  raise ValueError(f'model.weighting must be one of {WEIGHTINGS}, got {name!r}.')


def _output(num_dims: int, loss_recon, loss_klz, loss_diff, loss_diff_weighted, t, gamma_t,
            diff_integrand, gamma_0, gamma_1, loss_latent=None, objective=None,
            loss_second_order=None) -> 'VDMOutput':
  """The VDMOutput of the terms: bpd = (L_recon + L_prior + L_latent + L_diff)/(D ln 2)."""
  zeros = jnp.zeros_like(loss_recon)
  loss_latent = zeros if loss_latent is None else loss_latent
  loss_second_order = zeros if loss_second_order is None else loss_second_order
  if objective is None:
    objective = loss_recon + loss_klz + loss_latent + loss_diff_weighted
  return VDMOutput(
      loss_recon=loss_recon, loss_klz=loss_klz, loss_diff=loss_diff,
      bpd=bits_per_dim(loss_recon + loss_klz + loss_latent + loss_diff, num_dims),
      objective=objective, loss_diff_weighted=loss_diff_weighted, t=t, gamma_t=gamma_t,
      diff_integrand=diff_integrand, gamma_0=gamma_0, gamma_1=gamma_1,
      loss_latent=loss_latent, loss_second_order=loss_second_order)


# ------------------------------------------------------------------ the model
@flax.struct.dataclass
class VDMOutput:
  """Per-example outputs of the VDM ([B] each, nats unless named bpd)."""
  loss_recon: jax.Array  # L_recon (§3)
  loss_klz: jax.Array  # L_prior (§3), named as in the original code
  loss_diff: jax.Array  # L_∞ or L_T, unweighted (§3)
  bpd: jax.Array  # (L_prior + L_recon + L_latent + L_diff)/(D ln 2)
  objective: jax.Array  # training objective: L_recon + L_prior + weighted L_diff (§5)
  loss_diff_weighted: jax.Array  # w(λ_t)·L_diff; equals loss_diff for `elbo`
  t: jax.Array  # the times drawn (NaN where γ is drawn directly, in continuous time)
  gamma_t: jax.Array  # γ_t, the noise level of each example's diffusion term
  diff_integrand: jax.Array  # w(λ_t)·½‖ε − ε̂‖²: the weighted term per unit γ at γ_t (§11)
  loss_second_order: jax.Array  # the second-order term (§15.2) in the objective; 0 when off
  gamma_0: jax.Array  # γ(0), scalar
  gamma_1: jax.Array  # γ(1), scalar
  loss_latent: jax.Array  # KL(q(c|x) ‖ p(c)) of the mulan schedule's latent (§13.3); 0 otherwise


class VDM(nn.Module):
  """A Variational Diffusion Model built from a frozen `config.model` (docs/maths.md §1–§7).

  Submodules: `gamma` (the schedule, §2) and `score_model` (the network, §6); the
  encoder and decoder have no parameters. rng streams: 'sample' (ε_0, t, ε) and
  'dropout'.
  """
  config: Any  # ml_collections.FrozenConfigDict of config.model

  @classmethod
  def from_config(cls, model_config) -> 'VDM':
    return cls(ml_collections.FrozenConfigDict(model_config))

  def setup(self):
    cfg = self.config
    if self.multivariate:
      self.gamma = multivariate.PolynomialSchedule(cfg.gamma_min, cfg.gamma_max,
                                                   cfg.mulan_hidden)
      if cfg.mulan_latent_draws:
        self.latent_encoder = multivariate.LatentEncoder(
            cfg.mulan_latent_draws, cfg.mulan_latent_classes, max(cfg.mulan_hidden // 4, 1))
    else:
      self.gamma = schedules.make_schedule(cfg, name=None)
    self.score_model = networks.make_score_model(cfg, name=None)

  def weight(self, log_snr):
    """w(λ) of the configured weighting (§5)."""
    cfg = self.config
    return weighting(cfg.weighting, log_snr, cfg.sigmoid_bias, cfg.sigmoid_scale)

  @property
  def multivariate(self) -> bool:
    """A schedule per sub-pixel, conditioned on a latent of the image (§13)."""
    return self.config.schedule == multivariate.NAME

  def latent(self, f):
    """(c as a [B, K] vector, KL(q(c|x) ‖ p(c)) [B]) drawn from q(c|x) (§13.2), or
    (None, 0) without a latent."""
    if not (self.multivariate and self.config.mulan_latent_draws):
      return None, jnp.zeros(f.shape[:1], jnp.float32)
    logits = self.latent_encoder(f)
    return (multivariate.draw_latent(self.make_rng('sample'), logits),
            multivariate.latent_kl(logits))

  def gammas(self, t, latent=None, shape=None):
    """γ at times t: [B] (or scalar) for a scalar schedule; per sub-pixel, with `latent`
    and the image `shape` (H, W, C), for the mulan schedule (§13.1)."""
    if self.multivariate:
      return self.gamma(latent, t, shape)[0]
    return self.gamma(t)

  @property
  def _variance_reduction(self) -> bool:
    return bool(self.config.schedule_variance_reduction)

  def endpoints(self):
    """(γ_0, γ_1) = (γ(0), γ(1)); for a pinned schedule exactly its parameters."""
    if self.multivariate or (self.config.schedule == 'learned_nnet'
                             and self.config.schedule_endpoints == 'pinned'):
      return self.gamma.endpoints_value()
    return self.gamma(0.0), self.gamma(1.0)

  def score(self, z_t, gamma_t, conditioning, deterministic: bool = True, latent=None):
    """ε̂_θ(z_t, γ_t) (§6), also when the network predicts v (11.1); gamma_t is [B], or
    per sub-pixel [B, H, W, C] (§13: the network sees its mean, and the latent)."""
    per_pixel = jnp.ndim(gamma_t) == z_t.ndim
    gamma_net = jnp.mean(gamma_t, axis=tuple(range(1, z_t.ndim))) if per_pixel else gamma_t
    out = self.score_model(z_t, gamma_net, conditioning, deterministic, latent)
    if self.config.prediction == 'v':
      return eps_from_v(out, z_t, gamma_t if per_pixel else
                        jnp.reshape(gamma_t, (-1,) + (1,) * (z_t.ndim - 1)))
    return out

  def _gamma_terms(self, t, timesteps: int, gamma_0, gamma_1):
    """γ_t and either γ'(t) (T = 0) or γ_s (T > 0), with the §4 carrier if enabled.

    Returns (gamma_t, second, carrier); `second` is γ'(t) or γ_s.
    """
    if not self._variance_reduction:
      if timesteps == 0:
        gamma_t, gamma_prime = schedules.gamma_and_derivative(self.gamma, t)
        return gamma_t, gamma_prime, None
      return self.gamma(t), self.gamma(t - 1.0 / timesteps), None
    # §4: γ = γ_0 + (γ_1 − γ_0)·s(t); only the shape s passes the carrier.
    if timesteps == 0:
      shape_values = schedules.gamma_and_derivative(self.gamma.shape, t)
    else:
      shape_values = (self.gamma.shape(t), self.gamma.shape(t - 1.0 / timesteps))
    carrier = jnp.zeros((t.shape[0], 2), jnp.float32)
    (a, b), carrier = schedules.variance_gradient_carrier(shape_values, carrier)
    gamma_t = schedules.interpolate(gamma_0, gamma_1, a)
    if timesteps == 0:
      return gamma_t, (gamma_1 - gamma_0) * b, carrier
    return gamma_t, schedules.interpolate(gamma_0, gamma_1, b), carrier

  def __call__(self, images, conditioning, deterministic: bool = True,
               timesteps: Optional[int] = None, sampling: Optional[str] = None,
               bin_probs: Optional[jax.Array] = None) -> VDMOutput:
    """The bound for a batch of integer images [B, H, W, C] (§3).

    `timesteps` overrides T and `sampling` model.time_sampling (evaluation draws
    antithetic time whatever the training used); `bin_probs` are the adaptive
    proposal's bin masses (§11.5), computed from the train state.
    """
    cfg = self.config
    T = cfg.timesteps if timesteps is None else int(timesteps)
    sampling = cfg.time_sampling if sampling is None else sampling
    x = images
    batch = x.shape[0]
    gamma_0, gamma_1 = self.endpoints()
    f = encode(x, cfg.vocab_size)

    # 1. Reconstruction: −log p(x | z_0), z_0 = α_0 f + σ_0 ε_0.
    eps_0 = jax.random.normal(self.make_rng('sample'), f.shape)
    loss_recon = reconstruction_loss(x, f, eps_0, gamma_0, cfg.vocab_size)

    # 2. Prior: KL(q(z_1 | x) ‖ N(0, I)).
    loss_klz = prior_loss(f, gamma_1)

    # 3. Diffusion: one noise level per example, stratified over the global batch (§3e,
    #    §11); z_t = α_t f + σ_t ε, ε̂ = ε̂_θ(z_t, γ_t).
    u = time_sampling.stratified_uniforms(self.make_rng('sample'), batch,
                                          stratified=sampling != 'uniform')
    if self.multivariate:  # per sub-pixel, with the latent's KL (§13.3)
      terms = multivariate.diffusion_terms(self, f, u, conditioning, deterministic, T,
                                           sampling, bin_probs)
      return _output(f[0].size, loss_recon, loss_klz, gamma_0=gamma_0, gamma_1=gamma_1,
                     **terms)
    carrier = None
    if sampling in time_sampling.IN_GAMMA:
      proposal = time_sampling.Proposal(gamma_0, gamma_1, bin_probs)
      if T == 0:  # γ_t ~ p(γ) directly (11.3)
        gamma_t = proposal.inverse_cdf(u)
        t = jnp.full_like(u, jnp.nan)
      else:  # step k ~ q_k (11.6)
        k, q = proposal.draw_steps(u, self.gamma(jnp.arange(T + 1) / T))
        t = k / T
        gamma_t, gamma_s = self.gamma(t), self.gamma(t - 1.0 / T)
    else:
      t = u if T == 0 else discretise_times(u, T)
      gamma_t, second, carrier = self._gamma_terms(t, T, gamma_0, gamma_1)
    g = gamma_t[:, None, None, None]
    eps = jax.random.normal(self.make_rng('sample'), f.shape)
    z_t = jnp.sqrt(nn.sigmoid(-g)) * f + jnp.sqrt(nn.sigmoid(g)) * eps
    eps_hat, trace = second_order.score_and_trace(self, z_t, gamma_t, conditioning,
                                                  deterministic)
    if sampling in time_sampling.IN_GAMMA and T == 0:
      loss_diff = diffusion_loss_importance(proposal.log_density(gamma_t), eps, eps_hat)
    elif sampling in time_sampling.IN_GAMMA:
      loss_diff = diffusion_loss_discrete(gamma_t, gamma_s, T, eps, eps_hat) / (T * q)
    elif T == 0:
      loss_diff = diffusion_loss_continuous(second, eps, eps_hat)
    else:
      loss_diff = diffusion_loss_discrete(gamma_t, second, T, eps, eps_hat)

    # Training objective (§5): the weighting acts on the diffusion term only.
    w = weighting(cfg.weighting, -gamma_t, cfg.sigmoid_bias, cfg.sigmoid_scale)
    loss_diff_weighted = w * loss_diff
    loss_second_order = second_order.loss(cfg.second_order_weight, trace, eps, eps_hat,
                                          gamma_t, loss_diff)  # §15.2
    objective = loss_recon + loss_klz + loss_diff_weighted + loss_second_order
    if carrier is not None:
      objective = (objective + carrier[:, 0] * jax.lax.stop_gradient(loss_diff_weighted)
                   + carrier[:, 1])
    return _output(f[0].size, loss_recon, loss_klz, loss_diff, loss_diff_weighted, t, gamma_t,
                   0.5 * w * sum_except_batch(jnp.square(eps - eps_hat)), gamma_0, gamma_1,
                   objective=objective, loss_second_order=loss_second_order)

  # ---------------------------------------------------------------- §7 sampling
  def sample_step(self, i, timesteps: int, z_t, conditioning, rng, latent=None):
    """One ancestral step z_t → z_s, t = (T − i)/T, s = (T − i − 1)/T (§7); per
    sub-pixel for the mulan schedule, whose latent is given (§13.4)."""
    t = (timesteps - i) / timesteps
    s = (timesteps - i - 1) / timesteps
    gamma_t = self.gammas(t, latent, z_t.shape[1:])
    gamma_s = self.gammas(s, latent, z_t.shape[1:])
    c = -jnp.expm1(gamma_s - gamma_t)
    eps_hat = self.score(z_t, jnp.broadcast_to(gamma_t, z_t.shape) if self.multivariate
                         else jnp.full((z_t.shape[0],), gamma_t), conditioning, True, latent)
    sigma_t = jnp.sqrt(nn.sigmoid(gamma_t))
    mean = jnp.sqrt(nn.sigmoid(-gamma_s) / nn.sigmoid(-gamma_t)) * (z_t - sigma_t * c * eps_hat)
    eps_i = jax.random.normal(jax.random.fold_in(rng, i), z_t.shape)
    return mean + jnp.sqrt(nn.sigmoid(gamma_s) * c) * eps_i

  def decode(self, z_0, rng=None):
    """x from p(x | z_0), u = z_0/α_0: argmax, or a draw when `rng` is given (§7)."""
    gamma_0, _ = self.endpoints()
    u = z_0 / jnp.sqrt(nn.sigmoid(-gamma_0))
    logits = decoder_logits(u, gamma_0, self.config.vocab_size)
    if rng is None:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)

  def sample(self, rng, shape, conditioning=None, timesteps: int = 1000,
             decode: str = 'argmax'):
    """Ancestral sampling with T steps as one compiled loop (§7). shape = [N, H, W, C]."""
    if decode not in ('argmax', 'draw'):
      raise ValueError(f"decode must be 'argmax' or 'draw', got {decode!r}.")
    rng_init, rng_loop, rng_decode = jax.random.split(rng, 3)
    if conditioning is None:
      conditioning = jnp.zeros((shape[0],), jnp.float32)
    latent = None
    if self.multivariate and self.config.mulan_latent_draws:  # c ~ p(c) (§13.4)
      rng_init, rng_latent = jax.random.split(rng_init)
      latent = multivariate.draw_prior_latent(rng_latent, shape[0],
                                              self.config.mulan_latent_draws,
                                              self.config.mulan_latent_classes)
    z_1 = jax.random.normal(rng_init, shape)

    def body(mdl, carry):
      i, z = carry
      return i + 1, mdl.sample_step(i, timesteps, z, conditioning, rng_loop, latent)

    _, z_0 = nn.while_loop(lambda mdl, c: c[0] < timesteps, body, self,
                           (jnp.zeros((), jnp.int32), z_1))
    return self.decode(z_0, rng_decode if decode == 'draw' else None)
