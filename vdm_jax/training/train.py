"""Training: train_step, the compiled multi-step call and train_and_evaluate.

Data parallel over a Mesh of every device of every host (vdm_jax/runtime/parallel.py): the
global batch is sharded on 'data', the state replicated and donated, and
`config.training.steps_per_call` optimiser steps run per dispatch. The rng of step k is
fold_in(key, k) and its batch a function of (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

import functools
import math

from absl import logging
from clu import parameter_overview
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax import build as build_lib
from vdm_jax.data import input_pipeline
from vdm_jax import errors
from vdm_jax.evaluation import evaluate
from vdm_jax.evaluation import sampling
from vdm_jax.model import multivariate
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import compiler
from vdm_jax.runtime import gcs
from vdm_jax.runtime import parallel
from vdm_jax.runtime import signals as signals_lib
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock
from vdm_jax.training import optim
from vdm_jax.training import phema
from vdm_jax.training import train_state
from vdm_jax import validation

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
  mc = config.model
  adaptive = mc.time_sampling == 'adaptive'
  # The adaptive proposal of this step comes from the averages before it (§11.5).
  bin_probs = (time_sampling.adaptive_probs(state.time_sampler, mc.adaptive_decay,
                                            mc.adaptive_uniform) if adaptive else None)

  def loss_fn(params):
    out = model.apply({'params': params}, images, cond, deterministic=False,
                      bin_probs=bin_probs, rngs={'sample': k_sample, 'dropout': k_dropout})
    return jnp.mean(out.objective), out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = optim.ema_update(state.ema_params, params,
                                optim.ema_rate(config.optimizer, state.step))
  profiles = state.phema
  if profiles is not None:  # the power-function EMAs (docs/maths.md §14)
    profiles = phema.update(profiles, params, state.step,
                            phema.gammas(config.phema.sigma_rels))
  sampler = state.time_sampler
  if adaptive:
    if mc.schedule == multivariate.NAME:  # the mulan proposal is over t (§13.5)
      bins = time_sampling.Proposal(0.0, 1.0).bin_index(out.t, mc.adaptive_bins)
    else:
      bins = time_sampling.Proposal(out.gamma_0, out.gamma_1).bin_index(
          out.gamma_t, mc.adaptive_bins)
    sampler = time_sampling.update_adaptive(
        sampler, bins, jax.lax.stop_gradient(out.diff_integrand), mc.adaptive_decay)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = train_state.TrainState(
      step=state.step + 1, params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema_params, state.ema_params),
      time_sampler=keep(sampler, state.time_sampler), phema=keep(profiles, state.phema))

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
  if mc.schedule == multivariate.NAME:
    metrics['bpd_latent'] = jnp.mean(to_bpd(out.loss_latent))
  if config.model.weighting != 'elbo' or mc.second_order_weight:
    metrics['objective_bpd'] = jnp.mean(to_bpd(out.objective))
  if mc.second_order_weight:  # the second-order term's share of the objective (§15.2)
    metrics['bpd_second_order'] = jnp.mean(to_bpd(out.loss_second_order))
  return new_state, metrics


def make_train_call(model, tx, config, mesh):
  """jit(state, batches [S, B, …]) → (state, metrics [S]): S steps per dispatch."""
  _, key = build_lib.rng_streams(config.seed)
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
  snapshot_every = config.phema.snapshot_every if config.phema.sigma_rels else 0
  for every in (tc.steps_per_call, tc.log_every, tc.checkpoint_every, tc.eval_every,
                tc.sample_every, snapshot_every):
    if every and every > 0:
      stops.append((step // every + 1) * every)
  return min(stops)


def _stack(batches: list[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _is_multiple(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def nonfinite_message(step: int, metrics: dict, skipped: bool = False) -> str:
  bad = [name for name, key in (('reconstruction', 'finite_recon'),
                                ('prior', 'finite_prior'), ('diffusion', 'finite_diff'),
                                ('gradient', 'finite_grad')) if not metrics[key]]
  what = (f'Non-finite values at step {step}: {", ".join(bad) or "loss"} '
          f'(loss={metrics["loss"]}, grad_norm={metrics["grad_norm"]}).')
  if skipped:
    return what + ' The step was skipped (training.skip_nonfinite=True).'
  return what + (' The state was not updated by this step and nothing was saved after '
                 'it; the last good checkpoint is intact. Lower the learning rate or clip '
                 'gradients (optimizer.grad_clip), or set '
                 '--config.training.skip_nonfinite=True to skip such steps.')


def _agreed(*flags: bool) -> tuple[bool, ...]:
  """Each flag, true on every process when it is true on any (multi-host agreement)."""
  if jax.process_count() == 1:
    return flags
  gathered = multihost_utils.process_allgather(np.array(flags, dtype=bool))
  return tuple(bool(b) for b in np.any(gathered.reshape(-1, len(flags)), axis=0))


def _stop_if_lost(holding: workdir_lock.Holding, lost: bool) -> None:
  """Raises LockLostError on every process once any process's lock has a problem."""
  if lost:
    raise workdir_lock.LockLostError(
        holding.problem() or 'Process 0 lost the lock of the workdir (see its log); the '
        'run stopped without saving. Run the same command again.')


def _write_train_metrics(writer, step: int, pending: list[dict], skipped: int) -> None:
  merged = {k: np.concatenate([m[k] for m in pending]) for k in pending[0]}
  ok = merged['finite'].astype(bool)
  scalars = {f'train/{k}': float(np.mean(v[ok])) for k, v in merged.items()
             if not k.startswith('finite') and ok.any()}
  scalars['train/skipped_steps'] = skipped
  writer.write_scalars(step, scalars)


def _start(run, wd, manager, allow_config_change: bool):
  """The state to continue from (checked against the saved config), or a fresh one."""
  config = run.config
  saved = wd.read_config()
  steps = wd.checkpoint_steps()
  if saved is not None and steps:
    validation.check_resumed_config(saved, config, allow=allow_config_change)
    for change in validation.training_only_changes(saved, config):
      logging.warning('Resuming with a training-only field changed, %s.', change)
  if steps and steps[-1] > config.training.num_steps:
    raise validation.ConfigError([
        f'config.training.num_steps = {config.training.num_steps} is below the step of the '
        f'newest checkpoint in {wd.checkpoint_dir} ({steps[-1]}); nothing was changed. '
        f'Set it to {steps[-1]} or more to continue, or use another --workdir.'])
  num_profiles = len(config.phema.sigma_rels)
  restart = lambda tree: jax.device_put(phema.init(tree['params'], num_profiles), run.replicated)
  state = checkpoints.restore_latest(manager, run.abstract_state(),
                                     fresh={'phema': restart})
  if state is None:
    return run.init_state()
  tracked = tuple((saved or {}).get('phema', {}).get('sigma_rels', ()))
  if state.phema is not None and tracked != tuple(config.phema.sigma_rels):
    logging.warning('phema.sigma_rels is %s, the checkpoint tracked %s: the profiles start '
                    'afresh from the parameters.', tuple(config.phema.sigma_rels), tracked)
    state = state.replace(phema=restart({'params': state.params}))
  return state


def train_and_evaluate(config, workdir, *, mesh=None, allow_config_change: bool = False,
                       on_storage_lost=None) -> train_state.TrainState:
  """Trains (resuming from the workdir's newest checkpoint), evaluating and sampling
  periodically; returns the final state.

  config.json and the event file are written only once the run is known to start: the
  config valid, the lock taken, the workdir writable, the checkpoint to resume from
  restored. SIGTERM/SIGINT are deferred from before the lock is taken until it is let
  go: one before the first step raises errors.Stopped with nothing changed, one during
  training errors.Preempted after the step in flight and its checkpoint. Storage that
  stops answering (a save, or the lock's heartbeat, past training.storage_timeout)
  raises errors.StorageLost at once, with nothing more written or waited for; a
  failed request to it (connection refused) likewise skips the closing writes.
  on_storage_lost(message): see workdir_lock.hold's on_lost (the command line ends the
  process there, whatever call to the storage the run is blocked in).
  """
  wd = workdir_lib.Workdir(workdir)
  if config.eval.phema_sigma_rel is not None:  # evaluations while training use today's EMA
    config = config.copy_and_resolve_references()
    config.eval.phema_sigma_rel = None
  run = build_lib.build(config, mesh)
  wd.create()
  tc = config.training
  with (signals_lib.Deferred() as signals,
        workdir_lock.hold(wd, timeout=tc.storage_timeout,
                          on_lost=on_storage_lost) as holding):
    wd.check_writable()
    manager = checkpoints.make_manager(wd, keep=tc.keep_checkpoints, create=True,
                                       timeout=tc.storage_timeout)
    snapshots = (checkpoints.make_snapshot_manager(wd, create=True, timeout=tc.storage_timeout)
                 if config.phema.sigma_rels else None)
    managers = (manager,) if snapshots is None else (manager, snapshots)
    writer = None
    try:
      state = _start(run, wd, manager, allow_config_change)
      if _agreed(signals.signum is not None)[0]:
        raise errors.Stopped(signals.signum)
      wd.write_config(config)  # the run starts: every check above has passed
      writer = wd.metric_writer(just_logging=jax.process_index() > 0)
      step = int(jax.device_get(state.step))
      if step == 0:
        parameter_overview.log_parameter_overview(state.params)
        writer.write_hparams({k: v for k, v in validation.flatten(config).items()
                              if isinstance(v, (int, float, str, bool))})
      logging.info('Training %s from step %d to %d on %d device(s); workdir %s.',
                   run.info.name, step, tc.num_steps, run.mesh.devices.size, wd)
      state = _train_loop(run, wd, state, managers, writer, signals, holding)
    except errors.StorageLost:
      raise  # nothing more can be written: an abandoned save leaves no partial checkpoint
    except BaseException as e:
      if gcs.describe_fault(e, str(wd)) is None:  # the storage answers: close cleanly
        _close(managers, writer, tc.storage_timeout, quietly=True)
      raise
    _close(managers, writer, tc.storage_timeout)
  return state


def _close(managers, writer, timeout: float, quietly: bool = False) -> None:
  """Waits for the save in flight (never left half-written), flushes the metrics.

  quietly: on the way out after an error, which a failure here (the same storage,
  most likely) must not replace; it is logged instead.
  """
  try:
    for manager in managers:
      checkpoints.wait(manager, timeout)
      manager.close()
    if writer is not None:
      writer.flush()
  except Exception as e:  # pylint: disable=broad-except
    if not quietly:
      raise
    logging.error('While stopping: %s: %s', type(e).__name__, str(e)[:500])


def _snapshot_due(step: int, config, written: set) -> bool:
  """Whether the EMA profiles are snapshot after `step` (not again after a resume)."""
  due = _is_multiple(step, config.phema.snapshot_every) or step == config.training.num_steps
  return due and step not in written


def _train_loop(run, wd, state, managers, writer, signals, holding):
  config, tc = run.config, run.config.training
  step = int(jax.device_get(state.step))
  manager, snapshots = managers[0], (managers[1:] or (None,))[0]
  written = set(snapshots.all_steps()) if snapshots is not None else set()
  meta = dict(sigma_rels=list(config.phema.sigma_rels),
              gammas=list(phema.gammas(config.phema.sigma_rels)))
  train_call = make_train_call(run.model, run.tx, config, run.mesh)
  batches = input_pipeline.train_batches(
      config.data, global_batch_size=tc.batch_size, seed=config.seed, start_step=step)
  # Imports TensorFlow, as clu's writers do: here, not by every command (Workdir.metric_writer).
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top
  # Steps/s and time left, every 30 s (dispatches advance several steps at a time).
  report = periodic_actions.ReportProgress(num_train_steps=tc.num_steps, writer=writer,
                                           every_secs=30.0)
  first_step, pending, skipped = step, [], 0
  if step < tc.num_steps:
    local = _stack([next(batches) for _ in range(next_boundary(step, config) - step)])
  while step < tc.num_steps:
    n = next_boundary(step, config) - step
    global_batch = {k: parallel.global_array(run.mesh, v, leading_axes=1)
                    for k, v in local.items()}
    state, metrics = train_call(state, global_batch)  # asynchronous: the host goes on
    if step + n < tc.num_steps:  # read the next batches while the devices compute
      following = next_boundary(step + n, config) - step - n
      local = _stack([next(batches) for _ in range(following)])
    metrics = parallel.to_host(metrics)
    for j in np.flatnonzero(~metrics['finite'].astype(bool)):
      one = {k: v[j] for k, v in metrics.items()}
      if not tc.skip_nonfinite:
        raise errors.NonFiniteError(nonfinite_message(step + j, one))
      skipped += 1
      logging.warning('%s', nonfinite_message(step + j, one, skipped=True))
    pending.append(metrics)
    step += n
    report(step)
    if skipped > tc.max_skipped_fraction * (step - first_step) and step - first_step >= 10:
      raise errors.NonFiniteError(
          f'{skipped} of the {step - first_step} steps since step {first_step} had '
          'non-finite values and were skipped, more than training.max_skipped_fraction = '
          f'{tc.max_skipped_fraction}; the run is diverging. The last checkpoint is '
          'intact; lower the learning rate or clip gradients (optimizer.grad_clip).')

    if _is_multiple(step, tc.log_every) or step == tc.num_steps:
      _write_train_metrics(writer, step, pending, skipped)
      pending = []
    preempt, lost = _agreed(signals.signum is not None, holding.problem() is not None)
    _stop_if_lost(holding, lost)
    if _is_multiple(step, tc.checkpoint_every) or step == tc.num_steps or preempt:
      checkpoints.save(manager, step, state, tc.storage_timeout)
    if snapshots is not None and _snapshot_due(step, config, written):
      checkpoints.save_snapshot(snapshots, step, state.phema, dict(meta, step=step),
                                tc.storage_timeout)
    if preempt:
      for m in managers:
        checkpoints.wait(m, tc.storage_timeout)
      writer.flush()
      raise errors.Preempted(step, wd)
    if _is_multiple(step, tc.eval_every) and step < tc.num_steps:
      evaluate.evaluate_and_write(run, state, wd, writer)
    if _is_multiple(step, tc.sample_every) and step < tc.num_steps:
      sampling.sample_and_save(run, run.eval_params(state), wd, step, writer)
  if skipped:
    logging.warning('Skipped %d of the %d steps from %d to %d (non-finite values).',
                    skipped, step - first_step, first_step, step)
  return state
