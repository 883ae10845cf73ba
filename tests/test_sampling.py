"""Tests of vdm_jax.evaluation.sampling: the compiled sampler and the PNG grid (docs/maths.md §7)."""

import numpy as np

import common
from vdm_jax import build
from vdm_jax.evaluation import sampling
from vdm_jax.runtime import workdir as workdir_lib


def test_to_uint8_maps_the_vocabulary_onto_0_255():
  np.testing.assert_array_equal(sampling.to_uint8(np.array([0, 8, 16]), 17), [0, 128, 255])
  np.testing.assert_array_equal(sampling.to_uint8(np.array([0, 1]), 2), [0, 255])


def test_grid_places_every_image_once():
  images = np.arange(5)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8) + 1
  grid = sampling.make_grid(images.astype(np.uint8), pad=1)
  assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)  # 3 columns, 2 rows
  for i in range(5):
    r, c = divmod(i, 3)
    tile = grid[1 + r * 3:1 + r * 3 + 2, 1 + c * 4:1 + c * 4 + 3]
    assert (tile == i + 1).all()
  assert (grid[1 + 3:, 1 + 2 * 4:] == 0).all()  # the empty sixth place


def test_sample_and_save_is_deterministic_and_writes_the_grid(tmp_path):
  cfg = common.load_config('test')
  run = build.build(cfg)
  params = run.init_state().ema_params
  wd = workdir_lib.Workdir(tmp_path)
  first, path = sampling.sample_and_save(run, params, wd, step=3)
  again, _ = sampling.sample_and_save(run, params, wd, step=3)
  np.testing.assert_array_equal(first, again)
  assert first.shape == (4, 8, 8, 1) and first.min() >= 0 and first.max() < 17
  assert str(path).endswith('samples_3.png') and path.exists()
