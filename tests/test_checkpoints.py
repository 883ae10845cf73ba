"""Tests of vdm_jax.runtime.checkpoints: save, restore the newest good one, name mismatches."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import parallel
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import train_state


def _state(step, value, width=3):
  params = {'score_model': {'conv_in': {'kernel': jnp.full((width, 2), value)}},
            'gamma': {'w': jnp.full((1,), value)}}
  return train_state.TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                                opt_state={'mu': jnp.full((width,), value)},
                                ema_params=params)


def _abstract(width=3):
  return checkpoints.abstract_like(jax.eval_shape(lambda: _state(0, 0.0, width)),
                                   parallel.replicated(parallel.make_mesh()))


def _save_steps(wd, steps):
  manager = checkpoints.make_manager(wd, keep=5, asynchronous=False, create=True)
  for step in steps:
    checkpoints.save(manager, step, _state(step, float(step)))
  manager.wait_until_finished()
  manager.close()


def _restore(wd, **kwargs):
  manager = checkpoints.make_manager(wd)
  try:
    return checkpoints.restore_latest(manager, _abstract(), **kwargs)
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
  np.testing.assert_array_equal(state.opt_state['mu'], np.ones(3))
  names = sorted(os.listdir(wd.checkpoint_dir))
  assert names == (['1', '2.damaged'] if set_aside else ['1', '2'])


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
