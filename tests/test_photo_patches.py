"""experiments/photo_patches.py: photographs to P×P patches whose train and test splits
share no pixel, in the .npz form that data.dataset=npz trains on."""

import numpy as np
import pytest

import common
from vdm_jax import validation
from vdm_jax.data import datasets

photo_patches = common.load_experiment('photo_patches.py')


def _photos():
  rng = np.random.default_rng(0)
  return [(f'p{i}.png', rng.integers(0, 256, (h, w, 3), np.uint8))
          for i, (h, w) in enumerate([(100, 130), (64, 64), (40, 200)])]


def _pixels(origins, size):
  """The set of (photograph, row, column) that the patches cover."""
  return {(i, r + dr, c + dc) for i, r, c in origins for dr in range(size)
          for dc in range(size)}


@pytest.mark.parametrize('split', ['region', 'photo'])
def test_train_and_test_share_no_pixel_and_patches_are_the_photos(split):
  photos = _photos()
  out = photo_patches.cut(photos, size=8, split=split, block=32, train_stride=4)
  assert out['train'].shape[1:] == out['test'].shape[1:] == (8, 8, 3)
  assert not _pixels(out['train_origin'], 8) & _pixels(out['test_origin'], 8)
  for which in ('train', 'test'):
    for patch, (i, r, c) in zip(out[which], out[f'{which}_origin']):
      np.testing.assert_array_equal(patch, photos[i][1][r:r + 8, c:c + 8])
  # Test patches tile their regions: no two overlap.
  assert len(_pixels(out['test_origin'], 8)) == 64 * len(out['test'])
  if split == 'photo':
    assert set(out['test_origin'][:, 0]) == {2} and set(out['train_origin'][:, 0]) == {0, 1}


def test_region_split_takes_about_the_test_fraction_of_blocks():
  photo = [('big.png', np.zeros((640, 640, 3), np.uint8))]
  out = photo_patches.cut(photo, size=16, block=64, test_fraction=0.2)
  test_blocks = len(out['test']) / 16  # a 64-pixel block holds 16 test patches
  assert abs(test_blocks - 20) <= 3 * np.sqrt(100 * 0.2 * 0.8)  # binomial(100, 0.2)


def test_matplotlib_pictures_make_an_npz_that_the_npz_dataset_reads(tmp_path):
  photos = photo_patches.load_photos('matplotlib')
  assert len(photos) >= 1 and all(p.dtype == np.uint8 and p.shape[-1] == 3
                                  for _, p in photos)
  path = tmp_path / 'patches.npz'
  np.savez(path, **photo_patches.cut(photos))
  config = common.load_config('photo_patches')
  config.data.npz_path = str(path)
  info = validation.validate(config)
  assert (info.height, info.width, info.channels) == (16, 16, 3)
  assert datasets.load_split(config.data, 'test').shape[1:] == (16, 16, 3)


def test_bad_folders_and_settings_are_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('not a picture')
  with pytest.raises(ValueError, match='no picture'):
    photo_patches.load_photos(str(tmp_path))
  with pytest.raises(ValueError, match='No (train|test) patch'):
    photo_patches.cut([('small.png', np.zeros((8, 8, 3), np.uint8))], size=16)
  with pytest.raises(ValueError, match='test_fraction'):
    photo_patches.cut(_photos(), test_fraction=1.0)
