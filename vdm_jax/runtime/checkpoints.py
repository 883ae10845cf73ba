"""Orbax checkpoints of the training state in `WORKDIR/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary folder and renames it
when complete; on gs://, which has no rename, it writes `commit_success.txt` into the
step folder last and counts only folders that hold it), so a process killed at any
moment leaves the previous checkpoints intact; the newest checkpoint that restores is used, a damaged one is reported and
skipped. Restoring takes the target shardings from the current mesh, so a checkpoint
written on 8 devices restores on 1 and vice versa.
"""

import contextlib
import dataclasses
import gc
import inspect
import math
import sys
from typing import Any, Optional
import warnings

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from vdm_jax import errors
from vdm_jax.runtime import gcs

class CheckpointError(errors.InputError, ValueError):
  """No checkpoint of the workdir can be used; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint holds a different model (names or shapes) than the config builds."""


class SaveTimeoutError(CheckpointError, errors.StorageLost):
  """A checkpoint save did not finish within training.storage_timeout."""


def make_manager(workdir, keep: int = 3, asynchronous: bool = True, create: bool = False,
                 timeout: Optional[float] = None) -> ocp.CheckpointManager:
  """The orbax manager of `workdir.checkpoint_dir` (a vdm_jax.runtime.workdir.Workdir).

  An asynchronous save still unfinished after `timeout` seconds (orbax's default when
  None) is abandoned: `save` and `wait` then raise SaveTimeoutError.
  """
  return _manager(workdir.checkpoint_dir, {'state': ocp.StandardCheckpointHandler()},
                  keep, asynchronous, create, timeout)


def _manager(directory, item_handlers: dict, keep: Optional[int], asynchronous: bool,
             create: bool, timeout: Optional[float]) -> ocp.CheckpointManager:
  async_options = (None if timeout is None else
                   ocp.options.AsyncOptions(timeout_secs=max(1, math.ceil(timeout))))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=create, enable_async_checkpointing=asynchronous,
      async_options=async_options)
  if not gcs.is_gcs(directory):  # epath's absolute() would put the cwd before gs://
    directory = directory.absolute()
  return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


@contextlib.contextmanager
def _bounded(manager: ocp.CheckpointManager, timeout: Optional[float]):
  """Turns orbax's timeout of an asynchronous save into SaveTimeoutError."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # orbax re-raises its thread's error
    if not any(isinstance(c, TimeoutError) for c in errors.causes(e)):
      raise
    within = f'within {timeout:g} s (training.storage_timeout)' if timeout else 'in time'
    raise SaveTimeoutError(
        f'A checkpoint save to {manager.directory} did not finish {within}: the storage '
        'of the workdir stopped answering. The save was abandoned and the run stopped; '
        'the checkpoints complete before it are intact. Check the storage (network, '
        'credentials, bucket or disk) and run the same command again: training resumes '
        'from the newest complete checkpoint. (Raise training.storage_timeout if saves '
        'of this model take longer.)') from e


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         timeout: Optional[float] = None) -> None:
  """Starts an (asynchronous) save of `state` at `step`, once the previous one is done.

  `timeout`: the manager's (make_manager), named in the error when a save exceeds it.
  """
  with _bounded(manager, timeout):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                 force=True)


def wait(manager: ocp.CheckpointManager, timeout: Optional[float] = None) -> None:
  """Waits for the save in flight (SaveTimeoutError once it exceeds `timeout`)."""
  with _bounded(manager, timeout):
    manager.wait_until_finished()


def _flat_shapes(tree) -> dict:
  flat = flax.traverse_util.flatten_dict(
      flax.serialization.to_state_dict(tree), sep='/')
  return {k: tuple(getattr(v, 'shape', ())) for k, v in flat.items()}


def describe_mismatch(saved: dict, expected: dict, limit: int = 20) -> Optional[str]:
  """A readable list of parameters missing, unexpected or of another shape; None if equal."""
  lines = []
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      lines.append(f'  missing in checkpoint: {name} {expected[name]}')
    elif name not in expected:
      lines.append(f'  not in this model:     {name} {saved[name]}')
    elif tuple(saved[name]) != tuple(expected[name]):
      lines.append(f'  shape differs:         {name} checkpoint {tuple(saved[name])} '
                   f'vs model {tuple(expected[name])}')
  if not lines:
    return None
  more = f'\n  … and {len(lines) - limit} more' if len(lines) > limit else ''
  return '\n'.join(lines[:limit]) + more


def _saved_tree(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
  """The state's tree of array metadata in the checkpoint, without reading arrays."""
  try:
    meta = manager.item_metadata(step)
    tree = meta['state'] if 'state' in meta else meta.state
    tree = getattr(tree, 'tree', tree)  # orbax ≥ 0.11 wraps the tree in a TreeMetadata
    return dict(tree)
  except Exception:  # pylint: disable=broad-except
    return None


def _shapes(tree) -> dict:
  flat = flax.traverse_util.flatten_dict(tree, sep='/')
  return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}


def _restore_target(abstract_state: Any, saved: Optional[dict], resettable: tuple):
  """The restore target and the `resettable` fields to start afresh (as zeros).

  A resettable field (training bookkeeping such as the adaptive proposal's averages) that
  the checkpoint lacks, or holds with other shapes, is left out of the target, or taken
  with the saved shapes, and then replaced by zeros of the expected shapes; one that the
  state no longer has (None) is read with the saved shapes and dropped.
  """
  if saved is None:
    return abstract_state, ()
  # The fields as they are (an optimiser state's tuples stay tuples, as on disk).
  target = {f.name: getattr(abstract_state, f.name)
            for f in dataclasses.fields(abstract_state)}
  reset = []
  for name in resettable:
    absent = getattr(abstract_state, name, None) is None
    if absent and saved.get(name) is None:
      continue
    expected = None if absent else _shapes(
        flax.serialization.to_state_dict(getattr(abstract_state, name)))
    if name not in saved:  # written before the field existed
      del target[name]
    elif saved[name] is None:  # written empty
      target[name] = None
    elif _shapes(saved[name]) != expected:
      sharding = jax.tree.leaves(abstract_state)[0].sharding
      target[name] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[name])
    else:
      continue
    reset.append(name)
  return (target, tuple(reset)) if reset else (abstract_state, ())


def _zeros(abstract) -> Any:
  return jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding),
                      abstract)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any,
                   set_aside: bool = True, resettable: tuple = ('time_sampler', 'phema'),
                   fresh: Optional[dict] = None) -> Optional[Any]:
  """Restores the newest complete checkpoint onto `abstract_state`'s shardings.

  A damaged checkpoint (unreadable files) is reported and the previous one tried; once
  one restores, the damaged newer ones are set aside (moved to `<step>.damaged`), so
  that training can write those steps again and orbax never keeps them in place of
  good ones. A checkpoint of a different model raises CheckpointMismatchError naming
  the parameters. Returns the state, or None when there is no checkpoint. Readers that
  do not own the workdir (evaluation, sampling) pass set_aside=False and rename nothing.
  The `resettable` fields of a checkpoint written without them, or with other shapes,
  start afresh (see _restore_target): as `fresh[name](restored state dict)` where given,
  else as zeros.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  expected = _flat_shapes(abstract_state.params)
  damaged = []
  for step in steps:
    saved_tree = _saved_tree(manager, step)
    if saved_tree is not None and 'params' in saved_tree:
      diff = describe_mismatch(_shapes(saved_tree['params']), expected)
      if diff:
        raise CheckpointMismatchError(
            f'The checkpoint at step {step} in {manager.directory} holds a different '
            f'model than the config builds:\n{diff}\nUse the config it was trained with '
            '(saved as config.json beside it), or another --workdir.')
    target, reset = _restore_target(abstract_state, saved_tree, resettable)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
    except Exception as e:  # pylint: disable=broad-except
      logging.error('Checkpoint at step %d in %s is damaged and is skipped (%s: %s); '
                    'trying the previous one.', step, manager.directory,
                    type(e).__name__, e)
      restored = None
    if restored is None:
      damaged.append(step)
      _collect_quietly()
      continue
    if set_aside:
      _set_aside(manager, damaged)
    logging.info('Restored checkpoint at step %d from %s.', step, manager.directory)
    state = restored['state']
    if reset:
      logging.warning('The checkpoint at step %d holds no %s of the expected shapes; '
                      'it starts afresh%s.', step, ', '.join(reset),
                      ' (the adaptive proposal\'s averages per γ bin start at zero: '
                      'model.adaptive_bins changed, or the checkpoint has none)'
                      if 'time_sampler' in reset else '')
      kept = {k: flax.serialization.to_state_dict(v) for k, v in state.items()
              if k not in reset}
      new = {name: None if getattr(abstract_state, name) is None
             else flax.serialization.to_state_dict(
                 fresh[name](kept) if name in (fresh or {})
                 else _zeros(getattr(abstract_state, name))) for name in reset}
      state = flax.serialization.from_state_dict(abstract_state, {**kept, **new})
    return state
  if steps:
    raise CheckpointError(
        f'None of the checkpoints {sorted(steps)} in {manager.directory} could be restored '
        '(each error is logged above); nothing was changed. Restore the folder from a '
        'copy, or move it aside to start afresh.')
  return None


def _collect_quietly() -> None:
  """Finalises now, and without a word, the reads that a failed restore left behind.

  When one read of a restore fails, orbax's other reads (coroutines, some never
  awaited) stay referenced from cycles through the error's traceback. Whenever the
  garbage collector later finds them, each prints a warning or an "Exception ignored
  in: <coroutine …>" traceback (hundreds for a model's arrays, or none: it depends on
  when the collector runs). Collected here, with the process's hooks for exactly that
  quieted, the fallback to the previous checkpoint says only what the log says.
  """
  previous = sys.unraisablehook

  def hook(info):
    if not inspect.iscoroutine(info.object):
      previous(info)

  sys.unraisablehook = hook
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings('ignore', r'coroutine .* was never awaited', RuntimeWarning)
      gc.collect()
  finally:
    sys.unraisablehook = previous


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged step folders to `<step>.damaged` (kept for inspection).

  On gs://, which has no rename, the move copies every object of the folder and then
  deletes the originals (vdm_jax/runtime/gcs.py). Interrupted, the objects not yet
  deleted stay under `<step>`: while its `commit_success.txt` is among them the folder
  is found damaged and moved again by the next run; without it orbax ignores the folder
  and replaces it when it saves that step again.
  """
  if not steps:
    return
  if jax.process_index() == 0:
    for step in steps:
      path = manager.directory / str(step)
      target, n = path.parent / f'{step}.damaged', 1
      while target.exists():
        target, n = path.parent / f'{step}.damaged{n}', n + 1
      try:
        path.rename(target)
        logging.warning('Moved the damaged checkpoint at step %d to %s.', step, target)
      except OSError as e:
        logging.error('Could not move the damaged checkpoint %s aside: %s', path, e)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('vdm_jax.runtime.checkpoints.set_aside')
  manager.reload()


def abstract_like(state: Any, sharding) -> Any:
  """ShapeDtypeStructs of `state` with the given sharding: orbax's restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


# ------------------------------------- snapshots of the EMA profiles (docs/maths.md §14)
def make_snapshot_manager(workdir, create: bool = False, asynchronous: bool = True,
                          timeout: Optional[float] = None) -> ocp.CheckpointManager:
  """The orbax manager of `workdir.phema_dir`: every snapshot is kept, each written
  atomically like a checkpoint (a kill leaves the complete ones intact)."""
  return _manager(workdir.phema_dir, {'profiles': ocp.StandardCheckpointHandler(),
                                      'meta': ocp.JsonCheckpointHandler()},
                  None, asynchronous, create, timeout)


def save_snapshot(manager: ocp.CheckpointManager, step: int, profiles: Any, meta: dict,
                  timeout: Optional[float] = None) -> None:
  """Starts an (asynchronous) save of the profiles at `step`, with `meta` (their σ_rel, γ)."""
  with _bounded(manager, timeout):
    manager.save(step, args=ocp.args.Composite(profiles=ocp.args.StandardSave(profiles),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def snapshot_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']


def restore_snapshot(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
                     num_profiles: int) -> Any:
  """The profiles of the snapshot at `step`: leaves [K, ...] on abstract_params' shardings."""
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct((num_profiles,) + a.shape, a.dtype,
                                                       sharding=a.sharding), abstract_params)
  return manager.restore(step, args=ocp.args.Composite(
      profiles=ocp.args.StandardRestore(target)))['profiles']
