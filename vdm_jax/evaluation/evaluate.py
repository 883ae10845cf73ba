"""The variational bound on a whole split: K draws per image, standard errors (docs/maths.md §3).

One deterministic pass in dataset order, each image exactly once (the last batch
padded and masked), K independent (t, ε) draws per image whose mean is the image's
estimate; the reported bpd is the mean over images with its standard error. Terms
are reported beside it, and optionally the discrete-time bound L_T for given T.
"""

import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import build as build_lib
from vdm_jax.data import input_pipeline
from vdm_jax.evaluation import ode
from vdm_jax import errors
from vdm_jax.model import vdm
from vdm_jax.runtime import compiler
from vdm_jax.runtime import parallel
from vdm_jax.runtime import workdir as workdir_lib

TERMS = ('bpd', 'bpd_recon', 'bpd_prior', 'bpd_diff')


def make_eval_step(model: vdm.VDM, mesh, num_draws: int, timesteps: Optional[int]):
  """jit(params, batch, key) → {term: [B], mask: [B]}, each term the image's mean over
  `num_draws` draws.

  Time is drawn antithetically (§3e) whatever model.time_sampling trained with, so that
  the bound of every variant is the same estimator.
  """

  def step(params, batch, key):
    images, cond = batch['images'], batch['conditioning']
    num_dims = math.prod(images.shape[1:])
    per_image = {k: 0.0 for k in TERMS}
    for draw in range(num_draws):
      out = model.apply({'params': params}, images, cond, deterministic=True,
                        timesteps=timesteps, sampling='antithetic',
                        rngs={'sample': jax.random.fold_in(key, draw)})
      to_bpd = lambda nats: vdm.bits_per_dim(nats, num_dims)
      terms = dict(bpd=out.bpd, bpd_recon=to_bpd(out.loss_recon),
                   bpd_prior=to_bpd(out.loss_klz), bpd_diff=to_bpd(out.loss_diff))
      per_image = {k: per_image[k] + terms[k] / num_draws for k in TERMS}
    return dict(per_image, mask=batch['mask'])  # the global mask: padding is False

  return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                     parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh),
                 compiler_options=compiler.compiler_options())


def per_image(model: vdm.VDM, params: Any, config, mesh, *, timesteps: Optional[int] = None,
              split: Optional[str] = None) -> dict:
  """{term: [N]} over the split's images in order, each the mean of eval.num_draws draws.

  The draws depend on config.seed and the image's position only, so two models
  evaluated on the same split share them: their per-image difference is paired.
  """
  ev = config.eval
  key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  eval_step = make_eval_step(model, mesh, ev.num_draws, timesteps)
  parts = {k: [] for k in TERMS}
  batches = input_pipeline.eval_batches(config.data, split or ev.split,
                                        global_batch_size=ev.batch_size,
                                        num_examples=ev.num_examples)
  for i, batch in enumerate(batches):
    arrays = {k: parallel.global_array(mesh, np.asarray(v)) for k, v in batch.items()}
    terms = parallel.to_host(eval_step(params, arrays, jax.random.fold_in(key, i)))
    mask = np.asarray(terms['mask']).astype(bool)
    for k in TERMS:
      parts[k].append(np.asarray(terms[k], np.float64)[mask])
  return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(model: vdm.VDM, params: Any, config, mesh, *,
             timesteps_list: Sequence[Optional[int]] = (None,),
             split: Optional[str] = None) -> dict:
  """The bound on config.eval.split (or `split`) for each T in timesteps_list.

  T = None is the model's own (config.model.timesteps). Returns a dict with, for the
  model's own T, bpd, bpd_stderr and each term, and `discrete` {T: bpd, ...} for the
  others.
  """
  ev = config.eval
  split = split or ev.split
  results = {}
  for timesteps in timesteps_list:
    terms = per_image(model, params, config, mesh, timesteps=timesteps, split=split)
    n = len(terms['bpd'])
    entry = {k: float(np.mean(terms[k])) for k in TERMS}
    entry.update(bpd_stderr=float(np.std(terms['bpd'], ddof=1) / math.sqrt(n)) if n > 1
                 else 0.0, num_examples=n)
    results[timesteps] = entry
  own = results.pop(timesteps_list[0])
  own.update(split=split, num_draws=ev.num_draws,
             timesteps=config.model.timesteps if timesteps_list[0] is None else timesteps_list[0])
  if results:
    own['discrete'] = {str(t): r['bpd'] for t, r in results.items()}
    own['discrete_stderr'] = {str(t): r['bpd_stderr'] for t, r in results.items()}
  return own


def evaluate_and_write(run: build_lib.Run, state, wd: workdir_lib.Workdir,
                       writer=None) -> dict:
  """The bound of `state` (its EMA or raw parameters), written to the workdir's JSON."""
  config, step = run.config, int(jax.device_get(state.step))
  timesteps = [None] + [int(t) for t in config.eval.discrete_timesteps]
  results = evaluate(run.model, run.eval_params(state), config, run.mesh,
                     timesteps_list=timesteps)
  results.update(params=run.params_name, step=step)
  if not math.isfinite(results['bpd']):
    raise errors.NonFiniteError(
        f'The bound of the checkpoint at step {step} in {wd.checkpoint_dir} is not finite '
        f'(bpd = {results["bpd"]}): its parameters hold NaN or Inf, or the model diverged. '
        'Nothing was written; evaluate an earlier checkpoint or retrain.')
  wd.write_results(results, step)
  if writer is not None:
    scalars = {f'eval/{k}': v for k, v in results.items() if isinstance(v, float)}
    scalars.update({f'eval/bpd_T{t}': v for t, v in results.get('discrete', {}).items()})
    writer.write_scalars(step, scalars)
  return results


def _ode_and_write(run: build_lib.Run, state, wd: workdir_lib.Workdir, writer) -> dict:
  """The probability-flow ODE's likelihood of `state` (docs/maths.md §10), written to the
  workdir's ODE results JSON."""
  step = int(jax.device_get(state.step))
  results = ode.evaluate(run.model, run.eval_params(state), run.config, run.mesh)
  results.update(params=run.params_name, step=step)
  wd.write_results(results, step, name=ode.RESULTS_FILE)
  writer.write_scalars(step, {f'eval_ode/{k}': results[k] for k in ode.SCALARS
                              if k in results})
  return results


class _WriterOnFirstUse:
  """clu's metric writer, made (with its event file) only when there is something to
  write, so that an evaluation that fails leaves the workdir as it was."""

  def __init__(self, wd):
    self._wd, self._writer = wd, None

  def write_scalars(self, step: int, scalars: dict) -> None:
    if self._writer is None:
      self._writer = self._wd.metric_writer(just_logging=jax.process_index() > 0)
    self._writer.write_scalars(step, scalars)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()


def evaluate_workdir(config, workdir, mesh=None) -> dict:
  """--mode=eval: the workdir's newest checkpoint evaluated by config.eval.estimator (the
  bound, or the ODE's likelihood), the results written beside it."""
  wd = workdir_lib.Workdir(workdir)
  run, state = build_lib.restore(config, wd, mesh)
  writer = _WriterOnFirstUse(wd)
  try:
    if config.eval.estimator == 'ode':
      return _ode_and_write(run, state, wd, writer)
    return evaluate_and_write(run, state, wd, writer)
  finally:
    writer.flush()
