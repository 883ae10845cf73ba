"""The coding table of the bits-back codec: grids and Gaussians per level (docs/maths.md §9).

For T steps, level i holds z_i at t = i/T, or at the i-th of the levels placed for rate
(steps.py, §9.1). The table fixes, from those γ_i alone, the grid width δ_i of each
level and the means, standard deviations and supports (in grid bins) of the pop
q(z_i | z_{i-1}) and the push p(z_{i-1} | z_i) there, so that encoder and decoder code
every latent identically.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.codec import file_format
from vdm_jax.codec import fingerprints
from vdm_jax.codec import steps

MAX_BINS = 1 << 20  # constriction quantises probabilities to 2^-24: keep supports far below.

@dataclasses.dataclass(frozen=True)
class CodingTable:
  """Per-level constants of the scheme, float64, computed once from γ(i/T) (§9).

  Level i holds z_i, i = 0..T. Every per-step quantity below is a product or sum of
  these constants with integers or network outputs, so it is reproduced exactly.
  """
  timesteps: int
  resolution: int
  support: int
  gamma: np.ndarray  # [T+1] γ(i/T), float32 values
  delta: np.ndarray  # [T+1] grid width δ_i
  q_std: np.ndarray  # [T+1] std of the pop at level i, in bins: σ_0 or σ_{i|i-1}
  q_coef: np.ndarray  # [T+1] q mean in bins: q_coef·f at level 0, q_coef·k_{i-1} above
  q_half: np.ndarray  # [T+1] half-width of the pop's support, in bins
  p_std: np.ndarray  # [T+1] std of the push at level i: p(z_i|z_{i+1}), or N(0,1) at T
  p_centre: np.ndarray  # [T+1] centre of that push in bins = p_centre·k_{i+1}
  p_eps: np.ndarray  # [T+1] p mean in bins = centre − p_eps·ε̂(z_{i+1})
  p_half: np.ndarray  # [T+1] half-width of the push's support, in bins

  def digest(self) -> bytes:
    return fingerprints.digest(*(np.ascontiguousarray(getattr(self, f.name)).tobytes()
                                 if isinstance(getattr(self, f.name), np.ndarray)
                                 else str(getattr(self, f.name)).encode()
                                 for f in dataclasses.fields(self)))


def coding_table(gamma: np.ndarray, resolution: int, support: int) -> CodingTable:
  """The table for γ(i/T), i = 0..T (§9).

  α_i² = sigmoid(−γ_i), σ_i² = sigmoid(γ_i), c_i = −expm1(γ_{i−1} − γ_i);
  q(z_i|z_{i−1}) = N(α_i/α_{i−1}·z_{i−1}, c_i σ_i²), q(z_0|x) = N(α_0 f, σ_0²);
  p(z_{i−1}|z_i) = N(α_{i−1}/α_i·(z_i − σ_i c_i ε̂), c_i σ_{i−1}²) (§7).
  δ_i = min(pop std, push std)/resolution at level i.
  """
  g = np.asarray(gamma, np.float64)
  T = len(g) - 1
  alpha = np.sqrt(1.0 / (1.0 + np.exp(g)))
  sigma = np.sqrt(1.0 / (1.0 + np.exp(-g)))
  c = np.concatenate([[np.nan], -np.expm1(g[:-1] - g[1:])])
  if not np.all(c[1:] > 0):
    raise file_format.CodecError('γ(i/T) must increase strictly with i; the schedule '
                                  'is flat somewhere at this T.')
  q_std_abs = np.concatenate([[sigma[0]], np.sqrt(c[1:]) * sigma[1:]])
  p_std_abs = np.concatenate([np.sqrt(c[1:]) * sigma[:-1], [1.0]])
  delta = np.minimum(q_std_abs, p_std_abs) / resolution
  q_coef = np.concatenate([[alpha[0] / delta[0]],
                           alpha[1:] / alpha[:-1] * delta[:-1] / delta[1:]])
  q_std = q_std_abs / delta
  q_half = np.ceil(support * q_std) + 1
  # The push of z_{i-1} is centred on z_i/α_{i|i-1}: z_{i-1} lies within the pop's
  # support of z_i around it, mapped back, plus the two roundings to the grid.
  p_centre = np.concatenate([delta[1:] / delta[:-1] * alpha[:-1] / alpha[1:], [0.0]])
  p_eps = np.concatenate([alpha[:-1] / alpha[1:] * sigma[1:] * c[1:] / delta[:-1], [0.0]])
  p_half = np.concatenate([np.ceil((q_half[1:] + 0.5) * p_centre[:-1] + 0.5) + 1,
                           [np.ceil((alpha[T] + 2 * support * sigma[T]) / delta[T]) + 1]])
  if max(q_half.max(), p_half.max()) * 2 + 1 > MAX_BINS:
    raise file_format.CodecError(
        f'A support of {int(max(q_half.max(), p_half.max())) * 2 + 1} bins exceeds '
        f'{MAX_BINS}: lower config.codec.resolution or config.codec.support.')
  return CodingTable(T, int(resolution), int(support), g, delta, q_std, q_coef,
                     q_half.astype(np.int64), p_std_abs / delta, p_centre, p_eps,
                     p_half.astype(np.int64))


def gamma_grid(model, params, timesteps: int, density: tuple = ()) -> np.ndarray:
  """γ(i/T) for i = 0..T as the model computes it (float32), as float64; with a step
  density (steps.py, §9.1) the levels at its quantiles between γ(0) and γ(1)."""
  t = jnp.arange((1 if density else timesteps) + 1, dtype=jnp.float32)
  g = model.apply({'params': params}, t / t[-1], method=lambda m, t: m.gamma(t))
  g = np.asarray(jax.device_get(g), np.float64)
  return steps.placed_gamma(g[0], g[-1], density, timesteps) if density else g
