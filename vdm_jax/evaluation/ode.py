r"""The exact likelihood of a VDM through its probability-flow ODE (docs/maths.md §10).

In the model's own schedule γ(t), with α_t² = sigmoid(−γ_t) and σ_t² = sigmoid(γ_t),
the ODE whose marginals are those of the diffusion is

    dz/dt = ½·γ'(t)·σ_t·(ε̂(z, γ_t) − σ_t·z),                               (10.3)

and along a solution d log p_t(z_t)/dt = −div(dz/dt), so that

    log p_ε(z_ε) = log N(z_1; 0, I) + ∫_ε^1 div(dz/dt) dt.                (10.4)

Integer data are dequantised at t = ε (uniform or truncated-normal noise inside the
bin) and the bound −log P(x) ≤ E_q[−log p_ε(z_ε) + log q(z_ε | x)] is reported (10.5);
with K draws per image also the importance-weighted bound
−log (1/K) Σ_k p_ε(z_k)/q(z_k | x), tighter as K grows (§15.1).

Any ε̂ can be plugged in: `eps_fn(z, gamma_t)` with gamma_t of shape [B] and
`gamma_fn(t)`. `model_functions` builds both from a trained VDM.

    opts = ode.Options.from_config(config.ode)
    out = ode.nll(eps_fn, gamma_fn, images, vocab_size, opts, key)   # nats [B, K]
    results = ode.evaluate(model, params, config, mesh)              # like evaluate.evaluate

    python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist --mode=eval \
        --config.eval.estimator=ode --config.eval.batch_size=100 \
        [--config.ode.dequantisation=truncated_normal]

Every device integrates in lockstep: the whole global batch is one ODE system whose
step-size controller reduces its error norm over all images (a max over the batch
axis, i.e. one all-reduce per step under jit), so every device takes the same steps.
"""

import dataclasses
import math
import time
from typing import Any, Callable, Optional

import diffrax
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from vdm_jax.data import input_pipeline
from vdm_jax import errors
from vdm_jax.model import schedules
from vdm_jax.model import vdm
from vdm_jax.runtime import parallel

SOLVERS = ('dopri5', 'tsit5', 'heun', 'euler')
TRACES = ('exact', 'hutchinson')
PROBES = ('rademacher', 'gaussian')
DEQUANTISATIONS = ('uniform', 'truncated_normal')
RESULTS_FILE = 'eval_ode_results.json'
SCALARS = ('bpd', 'bpd_stderr', 'bpd_mc_stderr', 'bpd_iw', 'bpd_iw_stderr', 'nfe',
           'seconds_per_image')
# Vector field evaluations per step: (stages, whether the last is reused as the next first).
_STAGES = {'dopri5': (7, True), 'tsit5': (7, True), 'heun': (2, False), 'euler': (1, False)}


class SolverError(errors.InputError, RuntimeError):
  """The solver did not reach t = 1 within config.ode.max_steps steps."""


EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
GammaFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Options:
  """What `config.ode` chooses (see vdm_jax/config_base.py for each field)."""
  solver: str = 'dopri5'
  rtol: float = 1e-5
  atol: float = 1e-5
  num_steps: Optional[int] = None  # None: adaptive; an int: that many equal steps.
  t_eps: float = 1e-5
  trace: str = 'hutchinson'
  probe: str = 'rademacher'
  num_probes: int = 1
  dequantisation: str = 'uniform'
  max_steps: int = 4096
  trace_chunk: int = 64  # exact trace: VJPs computed at once (memory vs speed).

  @classmethod
  def from_config(cls, ode_config) -> 'Options':
    return cls(**{f.name: ode_config[f.name] for f in dataclasses.fields(cls)
                  if f.name in ode_config})

  @property
  def probes_per_solve(self) -> int:
    """K: log-density estimates per image from one solve (1 for the exact trace)."""
    return 1 if self.trace == 'exact' else self.num_probes


# ------------------------------------------------------------------ (10.3) the ODE
def drift(eps_hat: jax.Array, z: jax.Array, sigma_t, gamma_prime) -> jax.Array:
  """dz/dt = ½·γ'(t)·σ_t·(ε̂ − σ_t·z) (10.3)."""
  return 0.5 * gamma_prime * sigma_t * (eps_hat - sigma_t * z)


def _per_image_dot(a, b):
  return jnp.sum(a * b, axis=tuple(range(1, a.ndim)))


def trace_exact(vjp_fn, z: jax.Array, chunk: int) -> jax.Array:
  """tr(∂ε̂/∂z) per image [B] from D VJPs with one-hot cotangents (ε̂ acts per image)."""
  num_dims = math.prod(z.shape[1:])
  basis = jnp.eye(num_dims, dtype=z.dtype).reshape((num_dims,) + z.shape[1:])

  def diagonal_entry(e):
    (row,) = vjp_fn(jnp.broadcast_to(e, z.shape))  # row i of every image's Jacobian
    return _per_image_dot(row, jnp.broadcast_to(e, z.shape))

  return jnp.sum(jax.lax.map(diagonal_entry, basis, batch_size=min(chunk, num_dims)), 0)


def trace_hutchinson(vjp_fn, probes: jax.Array) -> jax.Array:
  """vᵀ(∂ε̂/∂z)v per probe and image [B, K]: E_v = tr when E[vvᵀ] = I (Hutchinson)."""
  def one(v):
    (vj,) = vjp_fn(v)
    return _per_image_dot(vj, v)
  return jax.vmap(one, out_axes=1)(probes)


def draw_probes(key, shape, num_probes: int, kind: str) -> jax.Array:
  """K probes [K, *shape], fixed along the whole solve: Rademacher ±1 or N(0, I)."""
  if kind == 'rademacher':
    return jax.random.rademacher(key, (num_probes,) + tuple(shape), jnp.float32)
  if kind == 'gaussian':
    return jax.random.normal(key, (num_probes,) + tuple(shape))
  raise ValueError(f'ode.probe must be one of {PROBES}, got {kind!r}.')


def vector_field(eps_fn: EpsFn, gamma_fn: GammaFn, opts: Options):
  """(t, (z, ∫div), probes) → (dz/dt, div(dz/dt) [B, K]) for diffrax."""

  def field(t, y, probes):
    z, _ = y
    gamma_t, gamma_prime = schedules.gamma_and_derivative(gamma_fn, t)
    sigma_t = jnp.sqrt(nn.sigmoid(gamma_t))
    gammas = jnp.full((z.shape[0],), gamma_t)
    eps_hat, vjp_fn = jax.vjp(lambda z_: eps_fn(z_, gammas), z)
    if opts.trace == 'exact':
      tr = trace_exact(vjp_fn, z, opts.trace_chunk)[:, None]
    else:
      tr = trace_hutchinson(vjp_fn, probes)
    # div(dz/dt) = ½·γ'·σ_t·(tr ∂ε̂/∂z − σ_t·D): the linear part's trace is exact.
    div = 0.5 * gamma_prime * sigma_t * (tr - sigma_t * math.prod(z.shape[1:]))
    return drift(eps_hat, z, sigma_t, gamma_prime), div

  return field


def batch_max_norm(scaled_error) -> jax.Array:
  """The controller's norm: max over images of each image's RMS error (z part and
  log-density part separately). One scalar for the whole global batch, so each image
  meets the tolerance as if it were integrated alone, and all devices step alike."""
  z, logp = scaled_error
  rms_z = jnp.sqrt(jnp.mean(jnp.square(z), axis=tuple(range(1, z.ndim))))
  rms_logp = jnp.sqrt(jnp.mean(jnp.square(logp), axis=1))
  return jnp.maximum(jnp.max(rms_z), jnp.max(rms_logp))


def _solver(name: str):
  solvers = {'dopri5': diffrax.Dopri5, 'tsit5': diffrax.Tsit5, 'heun': diffrax.Heun,
             'euler': diffrax.Euler}
  if name not in solvers:
    raise ValueError(f'ode.solver must be one of {SOLVERS}, got {name!r}.')
  return solvers[name]()


def function_evaluations(opts: Options, num_steps: jax.Array) -> jax.Array:
  """ε̂ evaluations of a solve: per step (rejected ones included) the solver's new
  stages, plus the first stage of a first-same-as-last solver. (diffrax 0.7 starts an
  adaptive solve of a wrapped term with dt0 = 0.01 without evaluating it; the tests
  count the evaluations.)"""
  stages, fsal = _STAGES[opts.solver]
  return (1 if fsal else 0) + (stages - 1 if fsal else stages) * num_steps


@flax.struct.dataclass
class Flow:
  """The end of a solve from t0 to t1: z(t1), ∫_{t0}^{t1} div dt [B, K], its cost."""
  z: jax.Array
  delta_logp: jax.Array
  num_steps: jax.Array
  nfe: jax.Array
  ok: jax.Array  # bool: the solver reached t1 within max_steps


def integrate(eps_fn: EpsFn, gamma_fn: GammaFn, z: jax.Array, t0: float, t1: float,
              opts: Options, probes: Optional[jax.Array] = None) -> Flow:
  """Solves (10.3) with the divergence integral from t0 to t1 (either direction)."""
  if opts.trace == 'hutchinson' and probes is None:
    raise ValueError("trace='hutchinson' needs probes (draw_probes).")
  k = opts.probes_per_solve
  y0 = (z, jnp.zeros((z.shape[0], k), z.dtype))
  term = diffrax.ODETerm(vector_field(eps_fn, gamma_fn, opts))
  if opts.num_steps is None:
    controller = diffrax.PIDController(rtol=opts.rtol, atol=opts.atol, norm=batch_max_norm)
    dt0 = None
  else:
    controller = diffrax.ConstantStepSize()
    dt0 = (t1 - t0) / opts.num_steps
  sol = diffrax.diffeqsolve(term, _solver(opts.solver), t0, t1, dt0, y0, args=probes,
                            stepsize_controller=controller, max_steps=opts.max_steps,
                            throw=False, adjoint=diffrax.RecursiveCheckpointAdjoint())
  z1, delta = sol.ys
  steps = sol.stats['num_steps']
  return Flow(z=z1[-1], delta_logp=delta[-1], num_steps=steps,
              nfe=function_evaluations(opts, steps),
              ok=sol.result == diffrax.RESULTS.successful)


# ------------------------------------------------------------------ (10.4) log-density
def log_standard_normal(z: jax.Array) -> jax.Array:
  """log N(z; 0, I) per image."""
  d = math.prod(z.shape[1:])
  return -0.5 * vdm.sum_except_batch(jnp.square(z)) - 0.5 * d * math.log(2 * math.pi)


def log_prob(eps_fn: EpsFn, gamma_fn: GammaFn, z: jax.Array, opts: Options,
             key: jax.Array) -> tuple[jax.Array, Flow]:
  """log p_ε(z) [B, K] = log N(z_1; 0, I) + ∫_ε^1 div dt (10.4), one value per probe."""
  probes = None
  if opts.trace == 'hutchinson':
    probes = draw_probes(key, z.shape, opts.num_probes, opts.probe)
  flow = integrate(eps_fn, gamma_fn, z, opts.t_eps, 1.0, opts, probes)
  return log_standard_normal(flow.z)[:, None] + flow.delta_logp, flow


# ------------------------------------------------------------------ (10.5) dequantisation
def _log_mass_standard_normal(tau):
  """log(Φ(τ) − Φ(−τ)) = log erf(τ/√2)."""
  return jnp.log(jax.scipy.special.erf(tau / math.sqrt(2.0)))


def dequantise(key, x: jax.Array, vocab_size: int, alpha, sigma, kind: str):
  """(z_ε, log q(z_ε | x)): a point of x's bin at t = ε and its density (10.5).

  The bin of x is α_ε·[f − 1/V, f + 1/V] (bin-centred embedding f, width 2/V).
  uniform:          z = α_ε·(f + (2/V)·(U − ½)),       log q = −D·log(2α_ε/V).
  truncated_normal: z = α_ε·f + σ_ε·ξ, ξ ~ N(0, 1) truncated to |ξ| ≤ τ = α_ε/(V·σ_ε),
                    i.e. the diffusion's own noise kept inside the bin (i-DODE).
  """
  f = vdm.encode(x, vocab_size)
  d = math.prod(x.shape[1:])
  if kind == 'uniform':
    u = jax.random.uniform(key, f.shape)
    z = alpha * (f + (2.0 / vocab_size) * (u - 0.5))
    return z, jnp.full((x.shape[0],), -d * jnp.log(2.0 * alpha / vocab_size))
  if kind == 'truncated_normal':
    tau = alpha / (vocab_size * sigma)
    xi = jax.random.truncated_normal(key, -tau, tau, f.shape)
    log_q = (-0.5 * vdm.sum_except_batch(jnp.square(xi))
             - d * (0.5 * math.log(2 * math.pi) + jnp.log(sigma) + _log_mass_standard_normal(tau)))
    return alpha * f + sigma * xi, log_q
  raise ValueError(f'ode.dequantisation must be one of {DEQUANTISATIONS}, got {kind!r}.')


def nll(eps_fn: EpsFn, gamma_fn: GammaFn, x: jax.Array, vocab_size: int, opts: Options,
        key: jax.Array) -> tuple[jax.Array, Flow]:
  """The bound −log p_ε(z_ε) + log q(z_ε | x) ≥ −log P(x) in nats, [B, K] (10.5)."""
  key_q, key_probes = jax.random.split(key)
  gamma_eps = gamma_fn(jnp.asarray(opts.t_eps, jnp.float32))
  alpha, sigma = jnp.sqrt(nn.sigmoid(-gamma_eps)), jnp.sqrt(nn.sigmoid(gamma_eps))
  z, log_q = dequantise(key_q, x, vocab_size, alpha, sigma, opts.dequantisation)
  logp, flow = log_prob(eps_fn, gamma_fn, z, opts, key_probes)
  return log_q[:, None] - logp, flow


# ------------------------------------------------------------------ a trained VDM
def _gamma(module, t):
  return module.gamma(t)


def model_functions(model: vdm.VDM, params, conditioning) -> tuple[EpsFn, GammaFn]:
  """(eps_fn, gamma_fn) of a VDM with the given parameters; no dropout."""
  variables = {'params': params}
  eps_fn = lambda z, g: model.apply(variables, z, g, conditioning, True,
                                    method=vdm.VDM.score)
  gamma_fn = lambda t: model.apply(variables, t, method=_gamma)
  return eps_fn, gamma_fn


def make_eval_step(model: vdm.VDM, mesh, opts: Options):
  """jit(params, batch, key) → (nll [B, K] nats, nfe, ok), the batch sharded over devices.

  One diffrax solve for the whole global batch: the controller's norm (batch_max_norm)
  reduces over every image, so every device takes the same steps.
  """
  def step(params, batch, key):
    eps_fn, gamma_fn = model_functions(model, params, batch['conditioning'])
    out, flow = nll(eps_fn, gamma_fn, batch['images'], model.config.vocab_size, opts, key)
    return out, flow.nfe, flow.ok

  return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                     parallel.replicated(mesh)),
                 out_shardings=(parallel.batch_sharding(mesh), parallel.replicated(mesh),
                                parallel.replicated(mesh)))


def summarise(samples: np.ndarray, num_dims: int) -> dict:
  """bpd statistics from nats [N images, M samples] (M = draws × probes).

  bpd_stderr is over images (of each image's mean over its samples, so it contains
  the Monte-Carlo noise); bpd_mc_stderr is the part due to probes and dequantisation
  alone: sqrt(mean_i Var_m / (M·N)).
  """
  to_bpd = 1.0 / (num_dims * math.log(2.0))
  n, m = samples.shape
  per_image = samples.mean(axis=1) * to_bpd
  out = dict(bpd=float(per_image.mean()),
             bpd_stderr=float(per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float('nan'),
             num_examples=int(n))
  if m > 1:
    within = samples.var(axis=1, ddof=1).mean() * to_bpd ** 2
    out['bpd_mc_stderr'] = float(math.sqrt(within / (m * n)))
  return out


def importance_weighted(nats: np.ndarray) -> np.ndarray:
  """Per image −log (1/K) Σ_k exp(−b_k) from K one-draw bounds b_k = −log p_ε(z_k) +
  log q(z_k | x), nats [N, K] (15.1): a bound on −log P(x), never above the mean of the
  b_k (Jensen) and equal to it when the K draws coincide."""
  return -(special.logsumexp(-np.asarray(nats, np.float64), axis=1) - math.log(nats.shape[1]))


def evaluate(model: vdm.VDM, params: Any, config, mesh, split: Optional[str] = None) -> dict:
  """The ODE bound on config.eval.split: bpd, its standard errors, NFE, seconds/image.

  eval.num_draws = K independent solves per image (fresh dequantisation and probes):
  bpd is the mean of the one-draw bounds, and for K > 1 bpd_iw the importance-weighted
  bound over the K draws (15.1), each draw's log-density the mean over its probes, with
  bpd_iw_stderr its standard error over images.
  """
  ev, opts = config.eval, Options.from_config(config.ode)
  split = split or ev.split
  step = make_eval_step(model, mesh, opts)
  key = jax.random.fold_in(jax.random.key(config.seed), 0x0DE)
  per_batch, nfes, compile_s, run_s, shape = [], [], 0.0, 0.0, None
  batches = input_pipeline.eval_batches(config.data, split, global_batch_size=ev.batch_size,
                                        num_examples=ev.num_examples)
  for i, batch in enumerate(batches):
    arrays = {k: parallel.global_array(mesh, np.asarray(v)) for k, v in batch.items()}
    shape = batch['images'].shape[1:]
    if i == 0:
      start = time.perf_counter()
      step = step.lower(params, arrays, key).compile()
      compile_s = time.perf_counter() - start
    draws = []
    for d in range(ev.num_draws):
      start = time.perf_counter()
      out, nfe, ok = parallel.to_host(step(params, arrays, jax.random.fold_in(key, i * ev.num_draws + d)))
      run_s += time.perf_counter() - start
      if not ok:
        raise SolverError(
            f'config.ode.max_steps = {opts.max_steps}: the ODE solver did not reach t = 1 '
            f'within that many steps (batch {i}). Raise --config.ode.max_steps, or loosen '
            'ode.rtol/ode.atol; no result was written.')
      draws.append(out)
      nfes.append(float(nfe))
    mask = parallel.to_host(arrays['mask']).astype(bool)
    per_batch.append(np.stack(draws, axis=1)[mask])  # [n, draws, K]
  nats = np.concatenate(per_batch)
  num_dims = math.prod(shape)
  results = summarise(nats.reshape(nats.shape[0], -1), num_dims)
  if ev.num_draws > 1:
    iw = summarise(importance_weighted(nats.mean(axis=2))[:, None], num_dims)
    results.update(bpd_iw=iw['bpd'], bpd_iw_stderr=iw['bpd_stderr'])
  n = results['num_examples']
  results.update(
      estimator='ode', split=split, num_draws=ev.num_draws, num_probes=opts.probes_per_solve,
      nfe=float(np.mean(nfes)), seconds=run_s, seconds_per_image=run_s / (n * ev.num_draws),
      compile_seconds=compile_s, solver=opts.solver, rtol=opts.rtol, atol=opts.atol,
      num_steps=opts.num_steps, t_eps=opts.t_eps, trace=opts.trace, probe=opts.probe,
      dequantisation=opts.dequantisation)
  return results
