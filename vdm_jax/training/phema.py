"""Post-hoc EMA: power-function EMA profiles and their reconstruction (docs/maths.md §14).

While training, each profile k of `config.phema.sigma_rels` keeps
θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ_k + 1), t the steps taken;
snapshots of all profiles are written every `phema.snapshot_every` steps
(vdm_jax/runtime/checkpoints.py). Afterwards the EMA of any relative width σ_rel is the
least-squares combination of the snapshots whose averaging profile is nearest, in L², to
the power-function profile of that σ_rel.
"""

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# σ_rel of γ = 0, the plain average of every step so far: the widest profile allowed.
SIGMA_REL_MAX = 1.0 / math.sqrt(12.0)


# ------------------------------------------------------------------ σ_rel ↔ γ (§14.1)
def gamma_to_sigma_rel(gamma: float) -> float:
  """σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3)))."""
  return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0."""
  if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
    raise ValueError(f'sigma_rel = {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}].')
  s = sigma_rel ** -2.0
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  gamma = float(np.max(roots[np.abs(roots.imag) < 1e-6].real))
  for _ in range(3):  # Newton steps: np.roots is accurate to ~1e-12 relative, this to rounding
    f = ((gamma + 7.0) * gamma + 16.0 - s) * gamma + 12.0 - s
    gamma -= f / ((3.0 * gamma + 14.0) * gamma + 16.0 - s)
  return gamma


def gammas(sigma_rels: Sequence[float]) -> tuple[float, ...]:
  return tuple(sigma_rel_to_gamma(float(s)) for s in sigma_rels)


# ------------------------------------------------------------ the profiles (§14.2)
def init(params: Any, num_profiles: int) -> Any:
  """Every leaf stacked num_profiles times: [K, ...] (step 1 overwrites it: β_1 = 0)."""
  return jax.tree.map(lambda p: jnp.repeat(p[None], num_profiles, axis=0), params)


def betas(t: jax.Array, gamma: Sequence[float]) -> tuple[jax.Array, jax.Array]:
  """(β_t, 1 − β_t) per profile, β_t = (1 − 1/t)^(γ + 1), float32 [K], both to rounding."""
  log_beta = (jnp.asarray(gamma, jnp.float32) + 1.0) * jnp.log1p(
      -1.0 / t.astype(jnp.float32))
  return jnp.exp(log_beta), -jnp.expm1(log_beta)


def update(profiles: Any, params: Any, step: jax.Array, gamma: Sequence[float]) -> Any:
  """The profiles after the step that made `params`: t = step + 1 steps taken."""
  beta, one_minus = betas(step + 1, gamma)

  def one(e, p):
    shape = (-1,) + (1,) * p.ndim
    return beta.reshape(shape) * e + one_minus.reshape(shape) * p[None]
  return jax.tree.map(one, profiles, params)


# -------------------------------------------------------- reconstruction (§14.3)
def inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
  """⟨p_a, p_b⟩ of the profiles p(τ) = (γ + 1) τ^γ / t^(γ+1) on [0, t], in closed form.

  For t_a ≤ t_b it is (γ_a + 1)(γ_b + 1)(t_a / t_b)^γ_b / ((γ_a + γ_b + 1) t_b); the
  roles swap otherwise. Arguments broadcast; float64.
  """
  t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in
                                                     (t_a, gamma_a, t_b, gamma_b)))
  first = t_a <= t_b
  t_lo, t_hi = np.where(first, t_a, t_b), np.where(first, t_b, t_a)
  gamma_hi = np.where(first, gamma_b, gamma_a)
  return ((gamma_a + 1.0) * (gamma_b + 1.0) * (t_lo / t_hi) ** gamma_hi
          / ((gamma_a + gamma_b + 1.0) * t_hi))


def solve_weights(snap_t, snap_gamma, target_t: float, target_gammas: Sequence[float]
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Weights x [J, C] of J snapshots for C targets (γ*, t*), and each fit's relative error.

  A x = b with A_jk = ⟨p_j, p_k⟩ and b_j = ⟨p_j, p*⟩, then x normalised to sum 1 (so a
  constant parameter is reproduced exactly). The error is ‖Σ_j x_j p_j − p*‖ / ‖p*‖.
  """
  t = np.asarray(snap_t, np.float64)
  g = np.asarray(snap_gamma, np.float64)
  target_g = np.asarray(target_gammas, np.float64)
  a = inner_products(t[:, None], g[:, None], t[None, :], g[None, :])
  b = inner_products(t[:, None], g[:, None], float(target_t), target_g[None, :])
  try:
    x = np.linalg.solve(a, b)
  except np.linalg.LinAlgError:  # two identical snapshots: the minimum-norm solution
    x = np.linalg.lstsq(a, b, rcond=None)[0]
  x = x / np.sum(x, axis=0, keepdims=True)
  target_norm = inner_products(target_t, target_g, target_t, target_g)
  residual = (np.einsum('jc,jk,kc->c', x, a, x) - 2.0 * np.einsum('jc,jc->c', x, b)
              + target_norm)
  return x, np.sqrt(np.maximum(residual, 0.0) / target_norm)


def reconstruct(snapshots: Sequence[tuple[int, Sequence[float]]],
                load: Callable[[int], Any], sigma_rels: Sequence[float], step: int
                ) -> tuple[list, np.ndarray]:
  """The EMAs of `sigma_rels` at `step` from snapshots taken at or before it.

  snapshots: (step t_j, the γ of each profile it holds) in any order; load(j) gives
  snapshot j's profiles, leaves [K_j, ...]. Each snapshot is loaded once. Returns one
  parameter tree per σ_rel and each fit's relative error (solve_weights).
  """
  rows = [(j, t, k, gk) for j, (t, gs) in enumerate(snapshots) if t <= step
          for k, gk in enumerate(gs)]
  if not rows:
    raise ValueError(f'No snapshot of the EMA profiles at or before step {step}.')
  x, error = solve_weights([r[1] for r in rows], [r[3] for r in rows], step,
                           gammas(sigma_rels))
  sums = [None] * len(sigma_rels)
  for j in sorted({r[0] for r in rows}):
    profiles = load(j)
    for row in (i for i, r in enumerate(rows) if r[0] == j):
      k = rows[row][2]
      for c in range(len(sigma_rels)):
        w = np.float32(x[row, c])
        term = jax.tree.map(lambda e, k=k, w=w: w * e[k], profiles)
        sums[c] = term if sums[c] is None else jax.tree.map(jnp.add, sums[c], term)
  return sums, error


def check_config(config) -> list[str]:
  """Problems of config.phema, eval.phema_sigma_rel and data.validation_size."""
  errors, p = [], config.phema
  where = f'in (0, {SIGMA_REL_MAX:.4f}] (γ ≥ 0; 0.2887 = the plain average of every step)'
  for name, values in (('phema.sigma_rels', p.sigma_rels), ('phema.candidates', p.candidates)):
    if not all(isinstance(s, (int, float)) and 0.0 < s <= SIGMA_REL_MAX for s in values):
      errors.append(f'config.{name} = {tuple(values)!r}: each must lie {where}.')
  if len(set(p.sigma_rels)) != len(p.sigma_rels):
    errors.append(f'config.phema.sigma_rels = {tuple(p.sigma_rels)!r} repeats a value.')
  if not p.candidates:
    errors.append('config.phema.candidates is empty: give the σ_rel to evaluate, e.g. '
                  "'(0.02, 0.05, 0.1)'.")
  if p.snapshot_every < 1:
    errors.append(f'config.phema.snapshot_every = {p.snapshot_every}: must be ≥ 1 (steps).')
  chosen = config.eval.phema_sigma_rel
  if chosen is not None and not 0.0 < chosen <= SIGMA_REL_MAX:
    errors.append(f'config.eval.phema_sigma_rel = {chosen}: must lie {where}, or be None.')
  if chosen is not None and not config.eval.use_ema:
    errors.append('config.eval.phema_sigma_rel is set but config.eval.use_ema = False asks '
                  'for the raw parameters; set one of them only.')
  if config.data.validation_size < 0:
    errors.append(f'config.data.validation_size = {config.data.validation_size}: must be ≥ 0.')
  if config.eval.split == 'validation' and config.data.validation_size < 1:
    errors.append("config.eval.split = 'validation' needs config.data.validation_size ≥ 1 "
                  '(the training images held out for it).')
  return errors


def from_workdir(wd, abstract_params: Any, sigma_rels: Sequence[float], step: int
                 ) -> tuple[list, dict]:
  """The EMAs of `sigma_rels` reconstructed from the snapshots in `wd` (a Workdir) at the
  newest snapshot at or before `step`; and where they come from (step, count, fit error)."""
  from vdm_jax.runtime import checkpoints  # pylint: disable=g-import-not-at-top
  from vdm_jax.runtime import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  manager = (checkpoints.make_snapshot_manager(wd, asynchronous=False)
             if wd.phema_dir.is_dir() else None)
  try:
    steps = sorted(t for t in (manager.all_steps() if manager else ()) if t <= step)
    if not steps:
      raise workdir_lib.WorkdirError(
          f'No snapshot of the EMA profiles in {wd.phema_dir} at or before step {step}: the '
          'run was trained with config.phema.sigma_rels = () or before snapshots existed. '
          'Unset eval.phema_sigma_rel to use the EMA of optimizer.ema_rate, or train '
          'with phema.sigma_rels set.')
    metas = [checkpoints.snapshot_meta(manager, t) for t in steps]
    load = lambda j: checkpoints.restore_snapshot(manager, steps[j], abstract_params,
                                                  len(metas[j]['gammas']))
    trees, error = reconstruct([(t, m['gammas']) for t, m in zip(steps, metas)], load,
                               sigma_rels, steps[-1])
  finally:
    if manager is not None:
      manager.close()
  return trees, dict(phema_step=steps[-1], phema_snapshots=len(steps),
                     phema_fit_error=[float(e) for e in error])
