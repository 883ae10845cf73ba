"""Where the diffusion term is evaluated: the noise level drawn for each example.

docs/maths.md §3e (time drawn uniformly) and §11 (noise levels drawn from a proposal):

    time_sampling  draw                                          the term is divided by
    antithetic     t_i = (u + i/B) mod 1 over the global batch   (nothing: p(t) = 1)
    uniform        t_i ~ U(0, 1), independently                  (nothing)
    sigmoid        γ_i ~ p(γ) ∝ sigmoid(−γ) on [γ_0, γ_1]         p(γ_i)            (11.4)
    adaptive       γ_i ~ p(γ) ∝ m_k, piecewise constant in γ      p(γ_i)            (11.5)

The proposals are stratified like antithetic time: u_i = (u + i/B) mod 1, then
γ_i = F⁻¹(u_i) with F the proposal's CDF. In discrete time (T steps) step k is drawn
with the proposal's mass q_k on [γ_{(k−1)/T}, γ_{k/T}] and its term divided by T·q_k.
The adaptive proposal's running averages live in the train state (`AdaptiveState`).
"""

from typing import Optional

import flax
import jax
import jax.numpy as jnp

TIME_SAMPLINGS = ('antithetic', 'uniform', 'sigmoid', 'adaptive')
IN_GAMMA = ('sigmoid', 'adaptive')  # drawn in γ from a proposal density (§11)


def stratified_uniforms(key: jax.Array, batch: int, stratified: bool = True) -> jax.Array:
  """u ∈ [0, 1)^B: u_i = (u + i/B) mod 1 over the *global* batch, or i.i.d. (§3e)."""
  if stratified:
    u = jax.random.uniform(key, ())
    return jnp.mod(u + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  return jax.random.uniform(key, (batch,))


def discretise_times(t: jax.Array, timesteps: int) -> jax.Array:
  """t ← ceil(t·T)/T, in {1/T, …, 1} (t = 0 maps to 1/T so that s = t − 1/T ≥ 0) (§3)."""
  return jnp.maximum(jnp.ceil(t * timesteps), 1.0) / timesteps


# ------------------------------------------------------------------ proposals (§11)
@flax.struct.dataclass
class Proposal:
  """A density p(γ) > 0 on [γ_0, γ_1] with its CDF F and inverse (docs/maths.md §11).

  bin_probs None: p(γ) ∝ sigmoid(−γ) = α²(γ) (11.4). Otherwise the masses of K bins of
  equal width Δ = (γ_1 − γ_0)/K, p(γ) = π_k/Δ in bin k (11.5). Gradients reach γ_0 and
  γ_1 through the draws and the density; the masses are held constant.
  """
  gamma_0: jax.Array
  gamma_1: jax.Array
  bin_probs: Optional[jax.Array] = None

  # sigmoid: with a(γ) = softplus(−γ), F(γ) = (a(γ_0) − a(γ))/Z, Z = a(γ_0) − a(γ_1).
  def _softplus_ends(self):
    a_0, a_1 = jax.nn.softplus(-self.gamma_0), jax.nn.softplus(-self.gamma_1)
    return a_0, a_0 - a_1

  def _bins(self):
    k = self.bin_probs.shape[0]
    width = (self.gamma_1 - self.gamma_0) / k
    starts = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(self.bin_probs)[:-1]])
    return k, width, jax.lax.stop_gradient(starts), jax.lax.stop_gradient(self.bin_probs)

  def bin_index(self, gamma: jax.Array, num_bins: int) -> jax.Array:
    """The bin k ∈ {0, …, K−1} of equal width over [γ_0, γ_1] that holds γ."""
    width = (self.gamma_1 - self.gamma_0) / num_bins
    k = jnp.floor((gamma - self.gamma_0) / width)
    return jnp.clip(k, 0, num_bins - 1).astype(jnp.int32)

  def cdf(self, gamma: jax.Array) -> jax.Array:
    gamma = jnp.clip(gamma, self.gamma_0, self.gamma_1)
    if self.bin_probs is None:
      a_0, z = self._softplus_ends()
      return (a_0 - jax.nn.softplus(-gamma)) / z
    k_bins, width, starts, probs = self._bins()
    position = (gamma - self.gamma_0) / width
    k = self.bin_index(gamma, k_bins)
    return starts[k] + probs[k] * jnp.clip(position - k, 0.0, 1.0)

  def inverse_cdf(self, u: jax.Array) -> jax.Array:
    """γ = F⁻¹(u) for u ∈ [0, 1), clipped to [γ_0, γ_1]."""
    if self.bin_probs is None:  # γ(u) = −log expm1(a(γ_0) − u·Z)   (11.4)
      a_0, z = self._softplus_ends()
      gamma = -jnp.log(jnp.expm1(a_0 - u * z))
    else:
      k_bins, width, starts, probs = self._bins()
      k = jnp.clip(jnp.searchsorted(starts, u, side='right') - 1, 0, k_bins - 1)
      within = jnp.clip((u - starts[k]) / probs[k], 0.0, 1.0)
      gamma = self.gamma_0 + width * (k + within)
    return jnp.clip(gamma, self.gamma_0, self.gamma_1)

  def log_density(self, gamma: jax.Array) -> jax.Array:
    """log p(γ), the density per unit γ."""
    if self.bin_probs is None:
      _, z = self._softplus_ends()
      return jax.nn.log_sigmoid(-gamma) - jnp.log(z)
    k_bins, width, _, probs = self._bins()
    return jnp.log(probs[self.bin_index(gamma, k_bins)]) - jnp.log(width)

  def draw_steps(self, u: jax.Array, gamma_grid: jax.Array):
    """Discrete time: (k ∈ {1, …, T}, q_k) for each u, with q_k ∝ the proposal's mass on
    [γ_grid[k−1], γ_grid[k]] (γ_grid = γ(i/T), i = 0…T; §11.6). q_k is held constant."""
    f = self.cdf(gamma_grid)
    steps_cdf = jax.lax.stop_gradient((f[1:] - f[0]) / (f[-1] - f[0]))  # [T], last = 1
    timesteps = steps_cdf.shape[0]
    k = jnp.clip(jnp.searchsorted(steps_cdf, u, side='right'), 0, timesteps - 1)
    below = jnp.where(k > 0, steps_cdf[jnp.maximum(k - 1, 0)], 0.0)
    return k + 1, steps_cdf[k] - below


# ------------------------------------------------------------ adaptive state (§11.5)
@flax.struct.dataclass
class AdaptiveState:
  """Running average m_k of the weighted diffusion integrand per γ bin (train state)."""
  mean_loss: jax.Array  # [K] float32: m_k, an exponential moving average (zero at first)
  updates: jax.Array  # [K] int32: how often bin k was updated (for the average's bias)


def init_adaptive(num_bins: int) -> AdaptiveState:
  return AdaptiveState(mean_loss=jnp.zeros((num_bins,), jnp.float32),
                       updates=jnp.zeros((num_bins,), jnp.int32))


def adaptive_probs(state: AdaptiveState, decay: float, uniform_share: float) -> jax.Array:
  """π_k ∝ m̂_k mixed with the uniform density: (1 − ρ)·m̂_k/Σm̂ + ρ/K (11.5).

  m̂_k = m_k/(1 − β^{n_k}) is the bias-corrected average of bin k after n_k updates;
  a bin never updated takes the mean of the others (all equal before the first step).
  """
  visited = state.updates > 0
  corrected = state.mean_loss / jnp.where(
      visited, -jnp.expm1(state.updates * jnp.log(decay)), 1.0)
  filler = jnp.sum(jnp.where(visited, corrected, 0.0)) / jnp.maximum(jnp.sum(visited), 1)
  m = jnp.where(visited, corrected, jnp.where(jnp.any(visited), filler, 1.0))
  m = jnp.maximum(m, 1e-30 + 1e-12 * jnp.max(m))
  k = m.shape[0]
  return (1.0 - uniform_share) * m / jnp.sum(m) + uniform_share / k


def update_adaptive(state: AdaptiveState, bins: jax.Array, values: jax.Array,
                    decay: float) -> AdaptiveState:
  """m_k ← β·m_k + (1 − β)·(mean of `values` drawn in bin k) for every bin with draws.

  `bins` and `values` are over the global batch, so under jit the per-bin sums are one
  all-reduce and every device and host holds the same state.
  """
  k = state.mean_loss.shape[0]
  one_hot = jax.nn.one_hot(bins, k, dtype=jnp.float32)  # [B, K]
  counts = jnp.sum(one_hot, axis=0)
  sums = jnp.einsum('bk,b->k', one_hot, values.astype(jnp.float32))
  seen = counts > 0
  mean = sums / jnp.maximum(counts, 1.0)
  return AdaptiveState(
      mean_loss=jnp.where(seen, decay * state.mean_loss + (1.0 - decay) * mean,
                          state.mean_loss),
      updates=state.updates + seen.astype(jnp.int32))
