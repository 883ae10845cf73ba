"""The variational bound on a whole split: K draws per image, standard errors (§3).

One deterministic pass in dataset order, each image exactly once (the last batch
padded and masked), K independent (t, ε) draws per image whose mean is the image's
estimate; the reported bpd is the mean over images with its standard error. Terms
are reported beside it, and optionally the discrete-time bound L_T for given T.
"""

import json
import math
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import compiler
from vdm_jax import input_pipeline
from vdm_jax import parallel
from vdm_jax import vdm

TERMS = ('bpd', 'bpd_recon', 'bpd_prior', 'bpd_diff')
RESULTS_FILE = 'eval_results.json'


def make_eval_step(model: vdm.VDM, mesh, num_draws: int, timesteps: Optional[int]):
  """jit(params, batch, key) → masked sums over the batch of each term, and of bpd²."""

  def step(params, batch, key):
    images, cond, mask = batch['images'], batch['conditioning'], batch['mask']
    num_dims = math.prod(images.shape[1:])
    per_image = {k: 0.0 for k in TERMS}
    for draw in range(num_draws):
      out = model.apply({'params': params}, images, cond, deterministic=True,
                        timesteps=timesteps, rngs={'sample': jax.random.fold_in(key, draw)})
      to_bpd = lambda nats: vdm.bits_per_dim(nats, num_dims)
      terms = dict(bpd=out.bpd, bpd_recon=to_bpd(out.loss_recon),
                   bpd_prior=to_bpd(out.loss_klz), bpd_diff=to_bpd(out.loss_diff))
      per_image = {k: per_image[k] + terms[k] / num_draws for k in TERMS}
    m = mask.astype(jnp.float32)
    sums = {k: jnp.sum(jnp.where(mask, v, 0.0)) for k, v in per_image.items()}
    sums['bpd_sq'] = jnp.sum(jnp.where(mask, per_image['bpd'] ** 2, 0.0))
    sums['count'] = jnp.sum(m)
    return sums

  return jax.jit(step, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh),
                                     parallel.replicated(mesh)),
                 out_shardings=parallel.replicated(mesh),
                 compiler_options=compiler.compiler_options())


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
  parallel.check_batch_divides(ev.batch_size, mesh, 'eval.batch_size')
  key = jax.random.fold_in(jax.random.key(config.seed), 0x5EED)
  results = {}
  for timesteps in timesteps_list:
    eval_step = make_eval_step(model, mesh, ev.num_draws, timesteps)
    totals = {}
    batches = input_pipeline.eval_batches(
        config.data, split, global_batch_size=ev.batch_size, num_examples=ev.num_examples)
    for i, batch in enumerate(batches):
      arrays = {k: parallel.global_array(mesh, np.asarray(v)) for k, v in batch.items()}
      sums = parallel.to_host(eval_step(params, arrays, jax.random.fold_in(key, i)))
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    n = totals['count']
    mean = {k: totals[k] / n for k in TERMS}
    var = max(totals['bpd_sq'] / n - mean['bpd'] ** 2, 0.0) * n / max(n - 1, 1)
    entry = dict(mean, bpd_stderr=math.sqrt(var / n), num_examples=int(n))
    results[timesteps] = entry
  own = results.pop(timesteps_list[0])
  own.update(split=split, num_draws=ev.num_draws,
             timesteps=config.model.timesteps if timesteps_list[0] is None else timesteps_list[0])
  if results:
    own['discrete'] = {str(t): r['bpd'] for t, r in results.items()}
    own['discrete_stderr'] = {str(t): r['bpd_stderr'] for t, r in results.items()}
  return own


def write_results(workdir: str, results: dict, step: int) -> str:
  """Writes eval_results.json (latest) and eval_results_<step>.json in the workdir."""
  payload = dict(results, step=int(step))
  for name in (RESULTS_FILE, f'eval_results_{int(step)}.json'):
    path = os.path.join(workdir, name)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  return os.path.join(workdir, RESULTS_FILE)
