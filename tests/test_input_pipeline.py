"""Tests of vdm_jax.data.input_pipeline: training order, augmentation, evaluation passes."""

import numpy as np
import pytest

import common
from vdm_jax.data import datasets
from vdm_jax.data import input_pipeline


def _transforms(image):
  """The 8 results of flip f in {0, 1} then k quarter turns; index 0 = identity."""
  out = []
  for flip in (False, True):
    base = image[:, ::-1] if flip else image
    out.extend(np.rot90(base, k, axes=(0, 1)) for k in range(4))
  return out


def _sorted_rows(images):
  flat = images.reshape(len(images), -1)
  return flat[np.lexsort(flat.T[::-1])]


# ------------------------------------------------------------- training order


@pytest.mark.parametrize('augment', [False, True])
def test_resume_gives_the_same_batches(augment):
  config = common.data_config(dataset='digits', augment=augment)
  kwargs = dict(global_batch_size=64, seed=3, process_index=0, process_count=1)
  # 1500 / 64 is not whole: batch 23 straddles epochs 0 and 1.
  reference = common.take(input_pipeline.train_batches(config, **kwargs), 50)
  for start in (1, 23, 24, 47):
    resumed = common.take(
        input_pipeline.train_batches(config, start_step=start, **kwargs), 3)
    for got, want in zip(resumed, reference[start:]):
      np.testing.assert_array_equal(got['images'], want['images'])
      np.testing.assert_array_equal(got['conditioning'], want['conditioning'])


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('process_count', [2, 4])
def test_batches_do_not_depend_on_process_count(augment, process_count):
  config = common.data_config(dataset='digits', augment=augment)
  kwargs = dict(global_batch_size=64, seed=1, start_step=22)
  single = common.take(input_pipeline.train_batches(
      config, process_index=0, process_count=1, **kwargs), 3)
  shares = [common.take(input_pipeline.train_batches(
      config, process_index=p, process_count=process_count, **kwargs), 3)
            for p in range(process_count)]
  for k, whole in enumerate(single):
    for key in ('images', 'conditioning'):
      parts = [share[k][key] for share in shares]
      assert all(len(part) == 64 // process_count for part in parts)
      np.testing.assert_array_equal(np.concatenate(parts), whole[key])


def test_batch_dtypes_and_seed_dependence():
  config = common.data_config(dataset='digits')
  kwargs = dict(global_batch_size=32, process_index=0, process_count=1)
  batch = next(input_pipeline.train_batches(config, seed=0, **kwargs))
  assert batch['images'].shape == (32, 8, 8, 1)
  assert batch['images'].dtype == np.uint8
  assert batch['conditioning'].dtype == np.float32
  assert not batch['conditioning'].any()
  other = next(input_pipeline.train_batches(config, seed=1, **kwargs))
  assert not np.array_equal(batch['images'], other['images'])


def test_each_epoch_sees_every_image_once():
  config = common.data_config(dataset='digits', num_train=1280)
  train = datasets.load_split(config, 'train')
  batches = common.take(input_pipeline.train_batches(
      config, global_batch_size=64, seed=0, process_index=0, process_count=1), 40)
  epoch0 = np.concatenate([b['images'] for b in batches[:20]])
  epoch1 = np.concatenate([b['images'] for b in batches[20:]])
  np.testing.assert_array_equal(_sorted_rows(epoch0), _sorted_rows(train))
  np.testing.assert_array_equal(_sorted_rows(epoch1), _sorted_rows(train))
  assert not np.array_equal(epoch0, epoch1)  # A fresh permutation per epoch.
  assert not np.array_equal(epoch0, train)  # Shuffled at all.


def test_train_batch_errors():
  config = common.data_config(dataset='digits')
  with pytest.raises(ValueError, match='does not divide among 3 processes'):
    input_pipeline.train_batches(config, global_batch_size=64, seed=0,
                                 process_index=0, process_count=3)
  with pytest.raises(ValueError, match='process_index=2'):
    input_pipeline.train_batches(config, global_batch_size=64, seed=0,
                                 process_index=2, process_count=2)


def test_defaults_to_jax_processes():
  config = common.data_config(dataset='digits')
  batch = next(input_pipeline.train_batches(config, global_batch_size=16, seed=0))
  assert batch['images'].shape[0] == 16  # One process in tests.


# --------------------------------------------------------------- augmentation


def test_augmentation_matches_spec():
  """Flip p 1/2, then p 1/2 a quarter turn of 1-3; flag = any fired (docs/maths.md §8)."""
  kwargs = dict(global_batch_size=64, seed=7, process_index=0, process_count=1)
  steps = 40
  plain = common.take(input_pipeline.train_batches(
      common.data_config(dataset='digits'), **kwargs), steps)
  augmented = common.take(input_pipeline.train_batches(
      common.data_config(dataset='digits', augment=True), **kwargs), steps)
  originals = np.concatenate([b['images'] for b in plain])
  images = np.concatenate([b['images'] for b in augmented])
  flags = np.concatenate([b['conditioning'] for b in augmented])
  assert set(np.unique(flags)) <= {0.0, 1.0}

  n = len(flags)
  std = np.sqrt(0.75 * 0.25 / n)
  assert abs(flags.mean() - 0.75) < 4 * std

  seen = np.zeros(8, int)  # Which transform, where the 8 results are distinct.
  for original, image, flag in zip(originals, images, flags):
    candidates = _transforms(original)
    if flag == 0:
      np.testing.assert_array_equal(image, original)
      continue
    matches = [i for i, c in enumerate(candidates[1:], 1)
               if np.array_equal(c, image)]
    assert matches, 'an augmented image is none of the 7 transforms'
    if len({c.tobytes() for c in candidates}) == 8:
      seen[matches[0]] += 1
  assert (seen[1:] > 0).all()  # Every non-identity transform occurs.
  # Among augmented images, a flip alone (index 4) has probability (1/4)/(3/4).
  m = seen[1:].sum()
  assert abs(seen[4] / m - 1 / 3) < 4 * np.sqrt(1 / 3 * 2 / 3 / m)


# ----------------------------------------------------------------- evaluation


@pytest.mark.parametrize('num_examples,batch_size,process_count', [
    (None, 64, 1), (None, 64, 2), (297, 100, 4), (100, 32, 4), (1, 8, 2),
    (297, 297, 1), (50, 7, 1), (96, 48, 3)])
def test_eval_covers_every_example_once(num_examples, batch_size, process_count):
  config = common.data_config(dataset='digits', augment=True)  # Ignored by eval.
  test = datasets.load_split(config, 'test')
  n = len(test) if num_examples is None else num_examples
  local_b = batch_size // process_count
  shares = [list(input_pipeline.eval_batches(
      config, 'test', global_batch_size=batch_size, num_examples=num_examples,
      process_index=p, process_count=process_count))
            for p in range(process_count)]
  num_batches = input_pipeline.num_eval_batches(n, batch_size)
  assert all(len(share) == num_batches for share in shares)
  collected = []
  for k in range(num_batches):
    for share in shares:
      batch = share[k]
      assert batch['images'].shape == (local_b, 8, 8, 1)
      assert batch['images'].dtype == np.uint8
      assert batch['mask'].dtype == np.bool_
      assert batch['conditioning'].dtype == np.float32
      assert not batch['conditioning'].any()
      collected.append(batch['images'][batch['mask']])
      assert not batch['images'][~batch['mask']].any()  # Zero padding.
  np.testing.assert_array_equal(np.concatenate(collected), test[:n])


def test_eval_errors_and_counts():
  assert input_pipeline.num_eval_batches(297, 100) == 3
  assert input_pipeline.num_eval_batches(300, 100) == 3
  assert input_pipeline.num_eval_batches(0, 100) == 0
  config = common.data_config(dataset='digits')
  with pytest.raises(ValueError, match='the test split has 297 images'):
    input_pipeline.eval_batches(config, 'test', global_batch_size=8,
                                num_examples=298, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='does not divide among 3 processes'):
    input_pipeline.eval_batches(config, 'test', global_batch_size=8,
                                process_index=0, process_count=3)
  train = list(input_pipeline.eval_batches(
      config, 'train', global_batch_size=500, process_index=0, process_count=1))
  assert sum(b['mask'].sum() for b in train) == 1500
