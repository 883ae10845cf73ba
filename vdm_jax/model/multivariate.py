"""A learned multivariate noise schedule conditioned on the input (MuLAN): docs/maths.md §13.

Every sub-pixel i has its own schedule, a monotone degree-5 polynomial in t between
endpoints shared by all sub-pixels (§13.1):

    γ_i(c, t) = γ_0 + (γ_1 − γ_0)·P_i(t)/P_i(1),   P_i(t) = ∫_0^t (a_i s² + b_i s + d_i)² ds,

with (a, b, d) per sub-pixel from a small network of a discrete latent c inferred from the
image by an encoder q(c|x) (§13.2). The bound gains KL(q(c|x) ‖ p(c)) (§13.3).

    latent   k independent categoricals with K classes each: c = (c_1, …, c_k), drawn exactly
             (Gumbel-max), passed on as the sum of their one-hot vectors [B, K] with a
             straight-through softmax gradient; p(c) uniform, so KL = Σ_j KL(q_j ‖ U(K)).
             k = 0: no latent, and (a, b, d) are free parameters per sub-pixel.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.model import schedules
from vdm_jax.model import time_sampling

NAME = 'mulan'


# ------------------------------------------------------------------ §13.1 the schedule
def polynomial_integral(a, b, d, t):
  """P(t) = ∫_0^t (a s² + b s + d)² ds = a²t⁵/5 + ab·t⁴/2 + (b² + 2ad)t³/3 + bd·t² + d²t."""
  return t * (d * d + t * (b * d + t * ((b * b + 2.0 * a * d) / 3.0
                                        + t * (a * b / 2.0 + t * a * a / 5.0))))


def polynomial_schedule(a, b, d, t, gamma_0, gamma_1):
  """(γ(t), γ′(t)) of γ = γ_0 + (γ_1 − γ_0)·P(t)/P(1), elementwise (§13.1).

  γ′(t) = (γ_1 − γ_0)·(a t² + b t + d)²/P(1), in closed form. P(t)/P(1) is exactly 0 at
  t = 0 and exactly 1 at t = 1 (the same float divided by itself), so every sub-pixel
  meets the shared endpoints exactly.
  """
  p_1 = polynomial_integral(a, b, d, jnp.ones_like(t))
  ratio = polynomial_integral(a, b, d, t) / p_1
  gamma = schedules.interpolate(gamma_0, gamma_1, ratio)
  gamma_prime = (gamma_1 - gamma_0) * jnp.square((a * t + b) * t + d) / p_1
  return gamma, gamma_prime


class Coefficients(nn.Module):
  """(a, b, d) of every sub-pixel's polynomial, from the latent or free (§13.1).

  With a latent [B, K]: `dense_hidden` → swish → `dense_out` (zero kernel, so that every
  image starts from the same per-pixel schedule, its bias). Without one: a parameter
  `coefficients` [3, H, W, C]. Zeros give a = b = 0 and one d for all: the linear schedule.
  """
  hidden: int = 64

  @nn.compact
  def __call__(self, latent: Optional[jax.Array], shape):
    """(a, b, d), each [B, H, W, C] (or [H, W, C] without a latent); d > 10⁻³."""
    num = math.prod(shape)
    if latent is None:
      raw = self.param('coefficients', nn.initializers.zeros, (3, *shape))
    else:
      h = nn.swish(nn.Dense(self.hidden, name='dense_hidden')(latent))
      raw = nn.Dense(3 * num, kernel_init=nn.initializers.zeros,
                     name='dense_out')(h).reshape(latent.shape[0], 3, *shape)
      raw = jnp.moveaxis(raw, 1, 0)
    return raw[0], raw[1], 1e-3 + nn.softplus(raw[2])


class PolynomialSchedule(nn.Module):
  """γ_i(c, t) for every sub-pixel i: shared endpoints, per-pixel shape (§13.1).

  Parameters (module name `gamma`): `gamma_0`, `gamma_1` (scalars, init γ_min, γ_max)
  and the `coefficients` module.
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  hidden: int = 64

  def setup(self):
    self.gamma_0 = self.param('gamma_0', nn.initializers.constant(self.gamma_min), ())
    self.gamma_1 = self.param('gamma_1', nn.initializers.constant(self.gamma_max), ())
    self.coefficients = Coefficients(self.hidden)

  def endpoints_value(self):
    return self.gamma_0, self.gamma_1

  def __call__(self, latent: Optional[jax.Array], t, shape):
    """(γ, γ′) for times t ([B] or scalar) at every sub-pixel of images of `shape`."""
    a, b, d = self.coefficients(latent, shape)
    t = jnp.asarray(t, jnp.float32)
    t = t.reshape(t.shape + (1,) * len(shape)) if t.ndim else t
    return polynomial_schedule(a, b, d, t, self.gamma_0, self.gamma_1)


# ------------------------------------------------------------------ §13.2 the latent
class LatentEncoder(nn.Module):
  """q(c|x): logits [B, k, K] of k categoricals from the embedded image f (§13.2)."""
  num_draws: int
  num_classes: int
  channels: int = 16

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    h = f
    for i, width in enumerate((self.channels, 2 * self.channels)):
      h = nn.swish(nn.Conv(width, (3, 3), strides=(2, 2), padding='SAME',
                           name=f'conv_{i}')(h))
    h = jnp.mean(h, axis=(1, 2))
    logits = nn.Dense(self.num_draws * self.num_classes, name='dense_out')(h)
    return logits.reshape(f.shape[0], self.num_draws, self.num_classes)


def draw_latent(key: jax.Array, logits: jax.Array) -> jax.Array:
  """c_j ~ q_j exactly (Gumbel-max), returned as Σ_j onehot(c_j) [B, K] whose gradient is
  that of Σ_j softmax(logits_j) (straight-through, §13.2)."""
  gumbel = jax.random.gumbel(key, logits.shape)
  hard = jax.nn.one_hot(jnp.argmax(logits + gumbel, axis=-1), logits.shape[-1])
  soft = jax.nn.softmax(logits, axis=-1)
  return jnp.sum(soft + jax.lax.stop_gradient(hard - soft), axis=1)


def draw_prior_latent(key: jax.Array, batch: int, num_draws: int,
                      num_classes: int) -> jax.Array:
  """c ~ p(c): k uniform categoricals, as Σ_j onehot(c_j) [B, K] (§13.4)."""
  classes = jax.random.randint(key, (batch, num_draws), 0, num_classes)
  return jnp.sum(jax.nn.one_hot(classes, num_classes), axis=1)


def latent_kl(logits: jax.Array) -> jax.Array:
  """KL(q(c|x) ‖ p(c)) = Σ_j Σ_v q_jv (log q_jv + log K) ≥ 0, in nats per example (§13.3)."""
  log_q = jax.nn.log_softmax(logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q + math.log(logits.shape[-1])), axis=-1)
  return jnp.sum(kl, axis=-1)


# ------------------------------------------------------------------ §13.3 the bound
def diffusion_loss_continuous(gamma_prime, eps, eps_hat):
  """L_∞ = ½·Σ_i γ′_i(t)(ε_i − ε̂_i)² (§13.3), [B]."""
  return 0.5 * jnp.sum(gamma_prime * jnp.square(eps - eps_hat), axis=(1, 2, 3))


def diffusion_loss_discrete(gamma_t, gamma_s, timesteps: int, eps, eps_hat):
  """L_T = ½·T·Σ_i expm1(γ_i(t) − γ_i(s))(ε_i − ε̂_i)², s = t − 1/T (§13.3), [B]."""
  return 0.5 * timesteps * jnp.sum(jnp.expm1(gamma_t - gamma_s) * jnp.square(eps - eps_hat),
                                   axis=(1, 2, 3))


def diffusion_terms(mdl, f, u, conditioning, deterministic: bool, timesteps: int,
                    sampling: str, bin_probs=None) -> dict:
  """The diffusion term of the mulan bound and the latent's KL, per example (§13.3).

  `mdl` is the bound VDM; `u` the stratified uniforms of the batch. With the adaptive
  proposal the times are drawn from a piecewise-constant density over t (not over γ,
  which is no longer one number per example) and each term is divided by it (§13.5);
  `diff_integrand` is then the weighted term per unit t, whose running mean per t-bin
  the proposal follows.
  """
  shape = f.shape[1:]
  if sampling == 'adaptive':
    proposal = time_sampling.Proposal(jnp.zeros(()), jnp.ones(()), bin_probs)
    if timesteps == 0:
      t = proposal.inverse_cdf(u)
      inverse_density = jnp.exp(-proposal.log_density(t))
    else:
      k, q = proposal.draw_steps(u, jnp.arange(timesteps + 1) / timesteps)
      t, inverse_density = k / timesteps, 1.0 / (timesteps * q)
  else:
    t = u if timesteps == 0 else time_sampling.discretise_times(u, timesteps)
    inverse_density = jnp.ones_like(u)
  eps = jax.random.normal(mdl.make_rng('sample'), f.shape)
  latent, loss_latent = mdl.latent(f)
  gamma_t, gamma_prime = mdl.gamma(latent, t, shape)
  z_t = jnp.sqrt(nn.sigmoid(-gamma_t)) * f + jnp.sqrt(nn.sigmoid(gamma_t)) * eps
  eps_hat = mdl.score(z_t, gamma_t, conditioning, deterministic, latent)
  w = mdl.weight(-gamma_t)
  if timesteps == 0:  # ½ Σ_i γ′_i (ε_i − ε̂_i)²
    per_pixel = 0.5 * gamma_prime * jnp.square(eps - eps_hat)
  else:  # ½ T Σ_i expm1(γ_i(t) − γ_i(s)) (ε_i − ε̂_i)²
    gamma_s, _ = mdl.gamma(latent, t - 1.0 / timesteps, shape)
    per_pixel = 0.5 * timesteps * jnp.expm1(gamma_t - gamma_s) * jnp.square(eps - eps_hat)
  integrand = jnp.sum(per_pixel, axis=(1, 2, 3))
  weighted = jnp.sum(w * per_pixel, axis=(1, 2, 3))
  return dict(loss_diff=integrand * inverse_density,
              loss_diff_weighted=weighted * inverse_density, t=t,
              gamma_t=jnp.mean(gamma_t, axis=(1, 2, 3)), diff_integrand=weighted,
              loss_latent=loss_latent)
