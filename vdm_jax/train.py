"""Training: create_train_state, train_step, train_and_evaluate (flax examples/imagenet).

Data parallel over a Mesh of every device of every host (vdm_jax/parallel.py): the
global batch is sharded on 'data', the state replicated and donated, and
`config.training.steps_per_call` optimiser steps run per dispatch under lax.scan.
The rng of step k is fold_in(key, k) and its batch a function of (seed, k), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

import functools
import json
import math
import os
import signal
import threading
from typing import Any, Optional

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax import checkpoints
from vdm_jax import compiler
from vdm_jax import evaluate
from vdm_jax import input_pipeline
from vdm_jax import optim
from vdm_jax import parallel
from vdm_jax import sampling
from vdm_jax import train_state
from vdm_jax import validation
from vdm_jax import vdm

CONFIG_FILE = 'config.json'
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request; run the same command again.


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
        f'Stopped by signal at step {step}; checkpoint written to '
        f'{os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}. Run the same command '
        'again to continue.')
    self.step = step


class NonFiniteError(FloatingPointError):
  """A non-finite loss or gradient; the state was not updated by that step."""


def make_model(config) -> vdm.VDM:
  return vdm.VDM.from_config(config.model)


def rng_streams(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training key): training step k uses fold_in(training key, k)."""
  root = jax.random.key(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def create_train_state(config, model: vdm.VDM, tx: optax.GradientTransformation,
                       mesh, image_shape, abstract: bool = False):
  """The initial TrainState, created by a jitted init directly replicated on the mesh.

  With abstract=True, returns ShapeDtypeStructs with shardings (orbax's restore target)
  without computing anything.
  """
  init_key, _ = rng_streams(config.seed)

  def init(key):
    k_params, k_sample, k_dropout = jax.random.split(key, 3)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
    params = model.init({'params': k_params, 'sample': k_sample, 'dropout': k_dropout},
                        x, jnp.zeros((1,), jnp.float32))['params']
    return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                  opt_state=tx.init(params), ema_params=params)

  rep = parallel.replicated(mesh)
  if abstract:
    return checkpoints.abstract_like(jax.eval_shape(init, init_key), rep)
  return jax.jit(init, out_shardings=rep)(init_key)


def train_step(model: vdm.VDM, tx: optax.GradientTransformation, config, key: jax.Array,
               state: train_state.TrainState, batch: dict):
  """One optimiser step on one global batch; returns (state, metrics).

  A step whose loss or gradient is not finite leaves the state unchanged (but counts
  the step); `metrics['finite']` tells the host, which stops or skips (config).
  """
  step_key = jax.random.fold_in(key, state.step)
  k_sample, k_dropout = jax.random.split(step_key)
  images, cond = batch['images'], batch['conditioning']
  num_dims = math.prod(images.shape[1:])

  def loss_fn(params):
    out = model.apply({'params': params}, images, cond, deterministic=False,
                      rngs={'sample': k_sample, 'dropout': k_dropout})
    return jnp.mean(out.objective), out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optim.ema_update(state.ema_params, params,
                                optim.ema_rate(config.optimizer, state.step))
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = train_state.TrainState(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema_params, state.ema_params))

  to_bpd = lambda nats: vdm.bits_per_dim(nats, num_dims)
  lr = optim.learning_rate_schedule(config.optimizer, config.training.num_steps)(state.step)
  metrics = dict(
      loss=loss, bpd=jnp.mean(out.bpd), bpd_recon=jnp.mean(to_bpd(out.loss_recon)),
      bpd_prior=jnp.mean(to_bpd(out.loss_klz)), bpd_diff=jnp.mean(to_bpd(out.loss_diff)),
      bpd_diff_var=jnp.var(to_bpd(out.loss_diff)), gamma_0=out.gamma_0,
      gamma_1=out.gamma_1, learning_rate=lr, grad_norm=grad_norm,
      param_norm=optax.global_norm(new_state.params), finite=finite,
      finite_recon=jnp.all(jnp.isfinite(out.loss_recon)),
      finite_prior=jnp.all(jnp.isfinite(out.loss_klz)),
      finite_diff=jnp.all(jnp.isfinite(out.loss_diff)),
      finite_grad=jnp.isfinite(grad_norm))
  if config.model.weighting != 'elbo':
    metrics['objective_bpd'] = jnp.mean(to_bpd(out.objective))
  return new_state, metrics


def make_train_call(model, tx, config, mesh):
  """jit(state, batches [S, B, …]) → (state, metrics [S]): S steps per dispatch."""
  _, key = rng_streams(config.seed)
  step_fn = functools.partial(train_step, model, tx, config, key)

  unroll = config.training.scan_unroll
  if unroll == 0:  # auto: XLA:CPU runs convolutions inside a while loop ~5x slower
    unroll = True if jax.default_backend() == 'cpu' else 1

  def call(state, batches):
    steps = jax.tree.leaves(batches)[0].shape[0]
    if unroll is True or unroll >= steps:
      # Fully unrolled: the steps one after another, no loop at all. (lax.scan would
      # keep a one-iteration while loop when steps = 1, and XLA:CPU ran the cifar10
      # step 24x slower inside it.)
      metrics = []
      for i in range(steps):
        state, m = step_fn(state, jax.tree.map(lambda x, i=i: x[i], batches))
        metrics.append(m)
      return state, jax.tree.map(lambda *m: jnp.stack(m), *metrics)
    return jax.lax.scan(step_fn, state, batches, unroll=unroll)

  rep = parallel.replicated(mesh)
  return jax.jit(call, in_shardings=(rep, parallel.batch_sharding(mesh, leading_axes=1)),
                 out_shardings=(rep, rep), donate_argnums=(0,),
                 compiler_options=compiler.compiler_options())


def next_boundary(step: int, config) -> int:
  """The next step at which the loop must stop a dispatch (log, save, eval, sample, end)."""
  tc = config.training
  stops = [tc.num_steps]
  for every in (tc.steps_per_call, tc.log_every, tc.checkpoint_every, tc.eval_every,
                tc.sample_every):
    if every and every > 0:
      stops.append((step // every + 1) * every)
  return min(stops)


def _stack(batches: list[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _is_multiple(step: int, every: int) -> bool:
  return bool(every) and every > 0 and step % every == 0


def nonfinite_message(step: int, metrics: dict, skipped: bool = False) -> str:
  bad = [name for name, key in (('reconstruction', 'finite_recon'),
                                ('prior', 'finite_prior'), ('diffusion', 'finite_diff'),
                                ('gradient', 'finite_grad')) if not metrics[key]]
  what = (f'Non-finite values at step {step}: {", ".join(bad) or "loss"} '
          f'(loss={metrics["loss"]}, grad_norm={metrics["grad_norm"]}).')
  if skipped:
    return what + ' The step was skipped (training.skip_nonfinite=True).'
  return what + (' The state was not updated by this step and nothing was saved after '
                 'it; the last good checkpoint is intact. Set '
                 '--config.training.skip_nonfinite=True to skip such steps instead.')


class _SignalFlag:
  """Records SIGTERM/SIGINT so that the loop can stop at the end of the step in flight."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signum = signum
    logging.warning('Received signal %d: finishing the step in flight, then saving.', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self) -> bool:
    """True on every process when any process got a signal (multi-host agreement)."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))


def _write_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


def load_saved_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _has_checkpoint(workdir: str) -> bool:
  path = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def setup(config, workdir: str, mesh=None, allow_config_change: bool = False):
  """Validation, model, optimiser and the data's shape: everything before compiling."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  info = validation.validate(config, mesh=mesh)
  saved = load_saved_config(workdir)
  if saved is not None and _has_checkpoint(workdir):  # else nothing was trained
    validation.check_resumed_config(saved, config, allow=allow_config_change)
  model = make_model(config)
  tx = optim.make_optimizer(config.optimizer, config.training.num_steps)
  image_shape = (info.height, info.width, info.channels)
  return mesh, info, model, tx, image_shape


def restore_or_init(config, workdir, model, tx, mesh, image_shape, manager,
                    init_if_missing: bool = True):
  abstract = create_train_state(config, model, tx, mesh, image_shape, abstract=True)
  state, meta = checkpoints.restore_latest(manager, abstract)
  if state is None and init_if_missing:
    state = create_train_state(config, model, tx, mesh, image_shape)
  return state, meta


def train_and_evaluate(config, workdir: str, *, mesh=None,
                       allow_config_change: bool = False) -> train_state.TrainState:
  """Trains (resuming from the workdir's newest checkpoint), evaluating and sampling
  periodically; returns the final state. Raises Preempted after a signal."""
  os.makedirs(workdir, exist_ok=True)
  mesh, info, model, tx, image_shape = setup(config, workdir, mesh, allow_config_change)
  tc = config.training
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  manager = checkpoints.make_manager(workdir, keep=tc.keep_checkpoints)
  state, _ = restore_or_init(config, workdir, model, tx, mesh, image_shape, manager)
  _write_config(workdir, config)
  step = int(jax.device_get(state.step))
  if step == 0:
    parameter_overview.log_parameter_overview(state.params)
    writer.write_hparams({k: v for k, v in _flat_config(config).items()
                          if isinstance(v, (int, float, str, bool))})
  logging.info('Training %s from step %d to %d on %d device(s); workdir %s.',
               info.name, step, tc.num_steps, mesh.devices.size, workdir)

  train_call = make_train_call(model, tx, config, mesh)
  batches = input_pipeline.train_batches(
      config.data, global_batch_size=tc.batch_size, seed=config.seed, start_step=step)
  # Steps/s and time left, every 30 s (dispatches advance several steps at a time).
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                           every_secs=30.0)
  try:
    with _SignalFlag() as signals:
      state = _train_loop(config, workdir, model, mesh, image_shape, state, step,
                          train_call, batches, report, writer, manager, signals)
  finally:
    manager.wait_until_finished()  # never leave a save half-written on the way out
    manager.close()
    writer.flush()
  return state


def _train_loop(config, workdir, model, mesh, image_shape, state, step, train_call,
                batches, report, writer, manager, signals):
  tc = config.training
  pending = []  # host metrics since the last write
  skipped = 0
  while step < tc.num_steps:
    n = next_boundary(step, config) - step
    local = _stack([next(batches) for _ in range(n)])
    global_batch = {k: parallel.global_array(mesh, v, leading_axes=1)
                    for k, v in local.items()}
    state, metrics = train_call(state, global_batch)
    metrics = parallel.to_host(metrics)
    for j in range(n):
      if not metrics['finite'][j]:
        one = {k: v[j] for k, v in metrics.items()}
        if not tc.skip_nonfinite:
          raise NonFiniteError(nonfinite_message(step + j, one))
        skipped += 1
        logging.warning('%s', nonfinite_message(step + j, one, skipped=True))
    pending.append(metrics)
    step += n
    report(step)

    if _is_multiple(step, tc.log_every) or step == tc.num_steps:
      _write_train_metrics(writer, step, pending, skipped)
      pending = []
    preempt = signals.agreed()
    if _is_multiple(step, tc.checkpoint_every) or step == tc.num_steps or preempt:
      checkpoints.save(manager, step, state, dict(step=step, data_position=step))
    if preempt:
      manager.wait_until_finished()
      writer.flush()
      raise Preempted(step, workdir)
    if _is_multiple(step, tc.eval_every) and step < tc.num_steps:
      run_eval(config, workdir, model, state, mesh, writer, step)
    if _is_multiple(step, tc.sample_every) and step < tc.num_steps:
      sampling.sample_and_save(model, state.ema_params, config, image_shape, workdir,
                               step, mesh, writer)
  return state


def _flat_config(config) -> dict:
  out = {}

  def walk(prefix, d):
    for k, v in d.items():
      if hasattr(v, 'items'):
        walk(f'{prefix}{k}.', v)
      else:
        out[f'{prefix}{k}'] = v
  walk('', config)
  return out


def _write_train_metrics(writer, step: int, pending: list[dict], skipped: int) -> None:
  merged = {k: np.concatenate([m[k] for m in pending]) for k in pending[0]}
  ok = merged['finite'].astype(bool)
  scalars = {}
  for k, v in merged.items():
    if k.startswith('finite') or not ok.any():  # a window of skipped steps only
      continue
    scalars[f'train/{k}'] = float(np.mean(v[ok]))
  scalars['train/skipped_steps'] = skipped
  writer.write_scalars(step, scalars)


def run_eval(config, workdir, model, state, mesh, writer, step: int) -> dict:
  """The bound on config.eval.split with the EMA (or raw) parameters; writes JSON."""
  params = state.ema_params if config.eval.use_ema else state.params
  timesteps = [None] + [int(t) for t in config.eval.discrete_timesteps]
  results = evaluate.evaluate(model, params, config, mesh, timesteps_list=timesteps)
  results.update(params='ema' if config.eval.use_ema else 'raw', step=int(step))
  if jax.process_index() == 0:
    evaluate.write_results(workdir, results, step)
  scalars = {f'eval/{k}': v for k, v in results.items() if isinstance(v, float)}
  for t, v in results.get('discrete', {}).items():
    scalars[f'eval/bpd_T{t}'] = v
  if writer is not None:
    writer.write_scalars(step, scalars)
  return results


def restore_for_inference(config, workdir: str, mesh=None):
  """(model, state, mesh, image_shape) from the workdir's newest checkpoint; errors if none."""
  mesh, _, model, tx, image_shape = setup(config, workdir, mesh, allow_config_change=False)
  manager = checkpoints.make_manager(workdir, keep=config.training.keep_checkpoints)
  state, _ = restore_or_init(config, workdir, model, tx, mesh, image_shape, manager,
                             init_if_missing=False)
  manager.close()
  if state is None:
    raise FileNotFoundError(
        f'No checkpoint in {os.path.join(workdir, checkpoints.CHECKPOINT_DIR)}: train first '
        '(--mode=train) or import one (--mode=import_original).')
  return model, state, mesh, image_shape


def evaluate_workdir(config, workdir: str, mesh=None) -> dict:
  """--mode=eval: the bound of the newest checkpoint, written to eval_results.json."""
  model, state, mesh, _ = restore_for_inference(config, workdir, mesh)
  step = int(jax.device_get(state.step))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  results = run_eval(config, workdir, model, state, mesh, writer, step)
  writer.flush()
  return results


def sample_workdir(config, workdir: str, mesh=None) -> str:
  """--mode=sample: a grid of samples from the newest checkpoint; returns the PNG path."""
  model, state, mesh, image_shape = restore_for_inference(config, workdir, mesh)
  step = int(jax.device_get(state.step))
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  params = state.ema_params if config.eval.use_ema else state.params
  _, path = sampling.sample_and_save(model, params, config, image_shape, workdir, step,
                                     mesh, writer)
  writer.flush()
  return path
