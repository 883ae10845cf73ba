"""Where the codec's T steps lie: equal steps in t, or steps placed for rate (docs/maths.md
§9.1).

The T-step bound exceeds the continuous one by about ¼·Σ_i Δγ_i²·w(γ_i), with
w(γ) = e^{−γ}·d/dγ(e^γ g(γ)) and g(γ) = E‖ε − ε̂(z_γ)‖²; for a given T it is least when
the steps' density in γ is ∝ √w. `estimate_density` measures √w on K equal bins of
[γ_0, γ_1] with the network and quantises it to K bytes (a file stores them);
`placed_gamma` puts the T + 1 levels at the quantiles of that piecewise-constant
density, the ends at γ_0 and γ_1:

    density = steps.estimate_density(model, params, images, vocab_size, gamma_0, gamma_1)
    gamma = steps.placed_gamma(gamma_0, gamma_1, density, timesteps)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.model import vdm

BINS = 32  # K: bins of the stored density
FLOOR = 0.05  # share of the equal-step density mixed in, so that every bin keeps steps


def placed_gamma(gamma_0: float, gamma_1: float, density, timesteps: int) -> np.ndarray:
  """γ_i, i = 0..T (float32 values as float64), at the i/T quantiles of the density
  (K positive numbers, one per equal bin of [γ_0, γ_1])."""
  d = np.asarray(density, np.float64)
  if d.ndim != 1 or not len(d) or not np.all(d > 0):
    raise ValueError(f'a step density needs positive bins, got {density!r}')
  cdf = np.concatenate([[0.0], np.cumsum(d)]) / d.sum()
  u = np.interp(np.arange(timesteps + 1) / timesteps, cdf, np.linspace(0, 1, len(d) + 1))
  g = np.float32(gamma_0) + (np.float32(gamma_1) - np.float32(gamma_0)) * u.astype(
      np.float32)
  g[0], g[-1] = np.float32(gamma_0), np.float32(gamma_1)
  return g.astype(np.float32).astype(np.float64)


def quantised(density: np.ndarray, floor: float = FLOOR) -> tuple:
  """The density mixed with `floor` of the flat one, as K integers 1..255 (max 255)."""
  d = np.maximum(np.nan_to_num(np.asarray(density, np.float64)), 0.0)
  d = d / d.mean() if d.sum() > 0 else np.ones_like(d)
  d = (1 - floor) * d + floor
  return tuple(int(v) for v in np.clip(np.round(255 * d / d.max()), 1, 255))


def error_curve(model, params, images, vocab_size: int, gammas, batch_size: int = 64,
                seed: int = 0) -> np.ndarray:
  """g(γ) = mean over images of ‖ε − ε̂(z_γ)‖² at each γ given, the same ε for every γ
  (common random numbers: the differences between levels are then smooth)."""
  gammas = jnp.asarray(gammas, jnp.float32)

  @jax.jit
  def curve(x, eps):
    f = vdm.encode(x, vocab_size)

    def at(gamma):
      z = jnp.sqrt(nn.sigmoid(-gamma)) * f + jnp.sqrt(nn.sigmoid(gamma)) * eps
      g = jnp.full((x.shape[0],), gamma)
      eps_hat = model.apply({'params': params}, z, g, jnp.zeros_like(g),
                            method=vdm.VDM.score)
      return vdm.sum_except_batch(jnp.square(eps - eps_hat))

    return jax.lax.map(at, gammas)  # [levels, batch]

  images = np.asarray(images)
  total = np.zeros(len(gammas))
  key = jax.random.key(seed)
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size].astype(np.int32)
    eps = jax.random.normal(jax.random.fold_in(key, start), x.shape)
    total += np.asarray(curve(x, eps), np.float64).sum(axis=1)
  return total / len(images)


def estimate_density(model, params, images, vocab_size: int, gamma_0: float,
                     gamma_1: float, bins: int = BINS, batch_size: int = 64) -> tuple:
  """√w on `bins` equal bins of [γ_0, γ_1], from g at the bin edges (§9.1), quantised."""
  edges = np.linspace(gamma_0, gamma_1, bins + 1)
  h = np.exp(edges) * error_curve(model, params, images, vocab_size, edges, batch_size)
  centres = (edges[:-1] + edges[1:]) / 2
  w = np.exp(-centres) * np.diff(h) / np.diff(edges)
  return quantised(np.sqrt(np.maximum(w, 0.0)))
