"""Tests of vdm_jax.runtime.checkpoints: save, restore the newest good one, name mismatches."""

import asyncio
import dataclasses
import gc
import os
import sys
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import common
from vdm_jax.model import time_sampling
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import parallel
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import phema
from vdm_jax.training import train_state


def _state(step, value, width=3, bins=None, profiles=0):
  params = {'score_model': {'conv_in': {'kernel': jnp.full((width, 2), value)}},
            'gamma': {'w': jnp.full((1,), value)}}
  sampler = None
  if bins is not None:
    sampler = time_sampling.AdaptiveState(mean_loss=jnp.full((bins,), value),
                                          updates=jnp.full((bins,), step, jnp.int32))
  moments = {'w': jnp.full((width,), value)}
  opt_state = (optax.ScaleByAdamState(jnp.asarray(step, jnp.int32), moments, moments),
               optax.EmptyState())  # optax's tree: a tuple of named tuples
  return train_state.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                opt_state=opt_state, ema_params=params, time_sampler=sampler,
                                phema=phema.init(params, profiles) if profiles else None)


def _abstract(width=3, bins=None, profiles=0):
  return checkpoints.abstract_like(
      jax.eval_shape(lambda: _state(0, 0.0, width, bins, profiles)),
      parallel.replicated(parallel.make_mesh()))


def _save_steps(wd, steps, bins=None):
  manager = checkpoints.make_manager(wd, keep=5, asynchronous=False, create=True)
  for step in steps:
    checkpoints.save(manager, step, _state(step, float(step), bins=bins))
  manager.wait_until_finished()
  manager.close()


def _restore(wd, bins=None, **kwargs):
  manager = checkpoints.make_manager(wd)
  try:
    return checkpoints.restore_latest(manager, _abstract(bins=bins), **kwargs)
  finally:
    manager.close()


def _damage(wd, step):
  with open(os.path.join(wd.checkpoint_dir, str(step), 'state', '_METADATA'), 'w') as f:
    f.write('garbage')


def test_no_checkpoint_restores_none(tmp_path):
  assert _restore(workdir_lib.Workdir(tmp_path)) is None


def test_newest_checkpoint_is_restored_exactly(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1, 2])
  common.assert_trees_equal(jax.device_get(_restore(wd)), jax.device_get(_state(2, 2.0)))
  assert wd.checkpoint_steps() == [1, 2]


@pytest.mark.parametrize('set_aside', [True, False])
def test_damaged_newest_is_skipped_and_set_aside_only_by_its_owner(tmp_path, set_aside):
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1, 2])
  _damage(wd, 2)
  state = _restore(wd, set_aside=set_aside)
  assert int(state.step) == 1
  np.testing.assert_array_equal(state.opt_state[0].mu['w'], np.ones(3))
  names = sorted(os.listdir(wd.checkpoint_dir))
  assert names == (['1', '2.damaged'] if set_aside else ['1', '2'])


def test_a_failed_restore_leaves_no_reads_for_the_collector_to_report(tmp_path, monkeypatch):
  """A restore that fails with reads pending (coroutines, one suspended, the others never
  awaited, in a reference cycle as orbax's are) falls back without a warning or an
  "Exception ignored" then or at any later collection."""
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1, 2])
  restore = checkpoints.ocp.CheckpointManager.restore

  async def read():
    try:
      await asyncio.sleep(3600)
    finally:
      await asyncio.sleep(0)  # a read that cleans up asynchronously: its close raises

  def failing(self, step, *args, **kwargs):
    if step != 2:
      return restore(self, step, *args, **kwargs)
    pending = [read() for _ in range(3)]
    pending[0].send(None)  # started, suspended in its sleep
    pending.append(pending)  # a cycle: only the collector frees it
    raise ValueError('DATA_LOSS: a read failed')

  monkeypatch.setattr(checkpoints.ocp.CheckpointManager, 'restore', failing)
  logged = []  # formatted at once: pytest's log capture would keep the error alive
  monkeypatch.setattr(checkpoints.logging, 'error', lambda m, *a: logged.append(m % a))
  reported = []
  monkeypatch.setattr(sys, 'unraisablehook', reported.append)
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter('always')
    state = _restore(wd, set_aside=False)
    gc.collect()
  assert int(state.step) == 1 and 'DATA_LOSS: a read failed' in logged[0]
  assert reported == [] and [str(w.message) for w in warned] == []


def test_all_damaged_is_an_error_that_changes_nothing(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1])
  _damage(wd, 1)
  with pytest.raises(checkpoints.CheckpointError, match=r'None of the checkpoints \[1\]'):
    _restore(wd)
  assert os.listdir(wd.checkpoint_dir) == ['1']


def test_another_model_is_named_parameter_by_parameter(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1])
  manager = checkpoints.make_manager(wd)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    checkpoints.restore_latest(manager, _abstract(width=4))
  manager.close()
  assert ('shape differs:         score_model/conv_in/kernel checkpoint (3, 2) vs model '
          '(4, 2)') in str(e.value)
  assert 'gamma/w' not in str(e.value)


def test_describe_mismatch_lists_missing_extra_and_reshaped():
  text = checkpoints.describe_mismatch({'a': (1,), 'b': (2,)}, {'b': (3,), 'c': (1,)})
  assert text.splitlines() == ['  not in this model:     a (1,)',
                               '  shape differs:         b checkpoint (2,) vs model (3,)',
                               '  missing in checkpoint: c (1,)']
  assert checkpoints.describe_mismatch({'a': (1,)}, {'a': (1,)}) is None


def test_the_adaptive_averages_are_restored_exactly(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  _save_steps(wd, [1, 2], bins=5)
  common.assert_trees_equal(jax.device_get(_restore(wd, bins=5)),
                            jax.device_get(_state(2, 2.0, bins=5)))


@pytest.mark.parametrize('saved_bins', ['no field', None, 7])
def test_averages_missing_or_of_another_size_start_afresh(tmp_path, saved_bins, caplog):
  """A checkpoint written without the adaptive averages (a train state without the field,
  or an empty one) or with other bins (another model.adaptive_bins) restores the rest
  exactly, optax's tree of the optimiser state included, and starts the averages at zero
  (docs/maths.md §11.5)."""
  wd = workdir_lib.Workdir(tmp_path)
  if saved_bins == 'no field':
    manager = checkpoints.make_manager(wd, asynchronous=False, create=True)
    state = _state(3, 3.0)  # as a train state without the field saved it
    legacy = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
              if f.name != 'time_sampler'}
    checkpoints.save(manager, 3, legacy)
    manager.close()
  else:
    _save_steps(wd, [3], bins=saved_bins)
  state = jax.device_get(_restore(wd, bins=5))
  expected = jax.device_get(_state(3, 3.0, bins=5))
  common.assert_trees_equal(state.params, expected.params)
  common.assert_trees_equal(state.opt_state, expected.opt_state)
  np.testing.assert_array_equal(state.time_sampler.mean_loss, np.zeros(5))
  np.testing.assert_array_equal(state.time_sampler.updates, np.zeros(5, np.int32))
  assert any('time_sampler' in r.getMessage() and 'model.adaptive_bins' in r.getMessage()
             for r in caplog.records)
  assert any('time_sampler' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('saved, expected', [(0, 2), (2, 0), (3, 2), (2, 2)])
def test_ema_profiles_restore_exactly_or_start_from_the_parameters(tmp_path, saved, expected):
  """Profiles (docs/maths.md §14) of the expected number restore exactly; a checkpoint
  without them, or with another number, starts them as `fresh` says (training: copies of
  the parameters); a state that tracks none restores the rest of a checkpoint that did."""
  wd = workdir_lib.Workdir(tmp_path)
  manager = checkpoints.make_manager(wd, asynchronous=False, create=True)
  written = _state(3, 3.0, profiles=saved)
  if saved:  # the profiles differ from the parameters, as after training
    written = written.replace(phema=jax.tree.map(lambda p: p + 1.0, written.phema))
  checkpoints.save(manager, 3, written)
  manager.close()
  manager = checkpoints.make_manager(wd)
  fresh = {'phema': lambda tree: phema.init(tree['params'], expected)}
  try:
    state = jax.device_get(checkpoints.restore_latest(manager, _abstract(profiles=expected),
                                                      fresh=fresh))
  finally:
    manager.close()
  common.assert_trees_equal(state.params, jax.device_get(written.params))
  if not expected:
    assert state.phema is None
  elif saved == expected:
    common.assert_trees_equal(state.phema, jax.device_get(written.phema))
  else:
    common.assert_trees_equal(state.phema, jax.device_get(phema.init(written.params, expected)))
