"""Tests of vdm_jax.build: one run from one config, and restoring it from a workdir."""

import jax
import numpy as np
import pytest

import common
from vdm_jax import build
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax import validation


def test_build_describes_the_data_and_the_state_it_will_create():
  run = build.build(common.load_config('test'))
  assert run.image_shape == (8, 8, 1) and run.info.num_test == 297
  abstract, state = run.abstract_state(), run.init_state()
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert (a.shape, a.dtype, a.sharding) == (x.shape, x.dtype, x.sharding)
  assert int(state.step) == 0
  common.assert_trees_equal(jax.device_get(state.params), jax.device_get(state.ema_params))
  again = run.init_state()  # a function of the seed alone
  common.assert_trees_equal(jax.device_get(state.params), jax.device_get(again.params))


def test_image_shape_replaces_reading_the_data():
  cfg = common.load_config('test')
  cfg.data.dataset, cfg.data.npz_path = 'npz', '/nonexistent.npz'  # never read
  run = build.build(cfg, image_shape=(16, 16, 3))
  assert run.image_shape == (16, 16, 3)
  kernel = run.abstract_state().params['score_model']['conv_in']['kernel']
  assert kernel.shape[2] == 3 * (1 + 2 * 2)  # z and its Fourier features, 3 channels


def test_build_validates_first():
  cfg = common.load_config('test')
  cfg.model.schedule = 'cosine'
  with pytest.raises(validation.ConfigError, match="config.model.schedule = 'cosine'"):
    build.build(cfg)


def test_restore_needs_a_workdir_with_a_checkpoint(tmp_path):
  cfg = common.load_config('test')
  with pytest.raises(workdir_lib.WorkdirError, match='does not exist'):
    build.restore(cfg, tmp_path / 'nowhere')
  assert not (tmp_path / 'nowhere').exists()
  with pytest.raises(workdir_lib.WorkdirError, match='No checkpoint in .*train first'):
    build.restore(cfg, tmp_path)


def test_rng_streams_are_distinct_and_fixed():
  a, b = build.rng_streams(0)
  a2, _ = build.rng_streams(0)
  assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))
  np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(a2))
