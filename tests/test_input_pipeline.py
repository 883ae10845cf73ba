"""Tests of vdm_jax.input_pipeline: data, order, augmentation (SPEC §1, §8)."""

import itertools

import numpy as np
import pytest

from vdm_jax import config_base
from vdm_jax import input_pipeline


def _data_config(**overrides):
  config = config_base.get_config().data
  for name, value in overrides.items():
    config[name] = value
  return config


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


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


# -------------------------------------------------------------------- datasets


def test_mnist_embedded_is_real_mnist():
  config = _data_config(dataset='mnist_embedded')
  train = input_pipeline.load_split(config, 'train')
  test = input_pipeline.load_split(config, 'test')
  assert train.shape == (4500, 28, 28, 1) and test.shape == (500, 28, 28, 1)
  assert train.dtype == np.uint8 and test.dtype == np.uint8
  assert 25 < train.mean() < 45 and 25 < test.mean() < 45  # MNIST: ~33.
  assert train.max() == 255 and train.min() == 0
  assert (train[:, 0] == 0).mean() > 0.9  # Black borders.
  info = input_pipeline.dataset_info(config)
  assert info == input_pipeline.DatasetInfo(
      name='mnist_embedded', height=28, width=28, channels=1, vocab_size=256,
      num_train=4500, num_test=500)
  assert not train.flags.writeable  # A view of the cache, protected.


def test_digits_split_and_vocab():
  config = _data_config(dataset='digits')
  train = input_pipeline.load_split(config, 'train')
  test = input_pipeline.load_split(config, 'test')
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  assert train.dtype == np.uint8 and max(train.max(), test.max()) == 16
  info = input_pipeline.dataset_info(config)
  assert (info.height, info.width, info.channels, info.vocab_size) == (8, 8, 1, 17)
  assert (info.num_train, info.num_test) == (1500, 297)


def test_num_train_keeps_the_first_images():
  full = input_pipeline.load_split(_data_config(dataset='digits'), 'train')
  config = _data_config(dataset='digits', num_train=100)
  np.testing.assert_array_equal(input_pipeline.load_split(config, 'train'),
                                full[:100])
  assert input_pipeline.dataset_info(config).num_train == 100
  assert len(input_pipeline.load_split(config, 'test')) == 297
  with pytest.raises(ValueError, match='exceeds the 1500 training images'):
    input_pipeline.load_split(_data_config(dataset='digits', num_train=2000),
                              'train')


def test_unknown_dataset_lists_accepted_names():
  with pytest.raises(ValueError, match='Unknown data.dataset=.cifar100.') as e:
    input_pipeline.load_split(_data_config(dataset='cifar100'), 'train')
  for name in input_pipeline.DATASETS:
    assert name in str(e.value)


@pytest.mark.parametrize('name', ['imagenet_resized', 'imagenet_resized/32x32'])
def test_imagenet_resized_is_refused(name):
  with pytest.raises(ValueError, match='refused.*different, easier dataset'):
    input_pipeline.dataset_info(_data_config(dataset=name))


def test_bad_split_name():
  with pytest.raises(ValueError, match='split=.valid.'):
    input_pipeline.load_split(_data_config(dataset='digits'), 'valid')


# ------------------------------------------------------------- training order


@pytest.mark.parametrize('augment', [False, True])
def test_resume_gives_the_same_batches(augment):
  config = _data_config(dataset='digits', augment=augment)
  kwargs = dict(global_batch_size=64, seed=3, process_index=0, process_count=1)
  # 1500 / 64 is not whole: batch 23 straddles epochs 0 and 1.
  reference = _take(input_pipeline.train_batches(config, **kwargs), 50)
  for start in (1, 23, 24, 47):
    resumed = _take(
        input_pipeline.train_batches(config, start_step=start, **kwargs), 3)
    for got, want in zip(resumed, reference[start:]):
      np.testing.assert_array_equal(got['images'], want['images'])
      np.testing.assert_array_equal(got['conditioning'], want['conditioning'])


@pytest.mark.parametrize('augment', [False, True])
@pytest.mark.parametrize('process_count', [2, 4])
def test_batches_do_not_depend_on_process_count(augment, process_count):
  config = _data_config(dataset='digits', augment=augment)
  kwargs = dict(global_batch_size=64, seed=1, start_step=22)
  single = _take(input_pipeline.train_batches(
      config, process_index=0, process_count=1, **kwargs), 3)
  shares = [_take(input_pipeline.train_batches(
      config, process_index=p, process_count=process_count, **kwargs), 3)
            for p in range(process_count)]
  for k, whole in enumerate(single):
    for key in ('images', 'conditioning'):
      parts = [share[k][key] for share in shares]
      assert all(len(part) == 64 // process_count for part in parts)
      np.testing.assert_array_equal(np.concatenate(parts), whole[key])


def test_batch_dtypes_and_seed_dependence():
  config = _data_config(dataset='digits')
  kwargs = dict(global_batch_size=32, process_index=0, process_count=1)
  batch = next(input_pipeline.train_batches(config, seed=0, **kwargs))
  assert batch['images'].shape == (32, 8, 8, 1)
  assert batch['images'].dtype == np.uint8
  assert batch['conditioning'].dtype == np.float32
  assert not batch['conditioning'].any()
  other = next(input_pipeline.train_batches(config, seed=1, **kwargs))
  assert not np.array_equal(batch['images'], other['images'])


def test_each_epoch_sees_every_image_once():
  config = _data_config(dataset='digits', num_train=1280)
  train = input_pipeline.load_split(config, 'train')
  batches = _take(input_pipeline.train_batches(
      config, global_batch_size=64, seed=0, process_index=0, process_count=1), 40)
  epoch0 = np.concatenate([b['images'] for b in batches[:20]])
  epoch1 = np.concatenate([b['images'] for b in batches[20:]])
  np.testing.assert_array_equal(_sorted_rows(epoch0), _sorted_rows(train))
  np.testing.assert_array_equal(_sorted_rows(epoch1), _sorted_rows(train))
  assert not np.array_equal(epoch0, epoch1)  # A fresh permutation per epoch.
  assert not np.array_equal(epoch0, train)  # Shuffled at all.


def test_train_batch_errors():
  config = _data_config(dataset='digits')
  with pytest.raises(ValueError, match='does not divide among 3 processes'):
    input_pipeline.train_batches(config, global_batch_size=64, seed=0,
                                 process_index=0, process_count=3)
  with pytest.raises(ValueError, match='process_index=2'):
    input_pipeline.train_batches(config, global_batch_size=64, seed=0,
                                 process_index=2, process_count=2)
  with pytest.raises(ValueError, match='fewer than the global batch size 2048'):
    input_pipeline.train_batches(config, global_batch_size=2048, seed=0,
                                 process_index=0, process_count=1)


def test_defaults_to_jax_processes():
  config = _data_config(dataset='digits')
  batch = next(input_pipeline.train_batches(config, global_batch_size=16, seed=0))
  assert batch['images'].shape[0] == 16  # One process in tests.


# --------------------------------------------------------------- augmentation


def test_augmentation_matches_spec():
  """Flip p 1/2, then p 1/2 a quarter turn of 1-3; flag = any fired (SPEC §8)."""
  kwargs = dict(global_batch_size=64, seed=7, process_index=0, process_count=1)
  steps = 40
  plain = _take(input_pipeline.train_batches(
      _data_config(dataset='digits'), **kwargs), steps)
  augmented = _take(input_pipeline.train_batches(
      _data_config(dataset='digits', augment=True), **kwargs), steps)
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


def test_augmentation_needs_square_images(tmp_path):
  path = tmp_path / 'wide.npz'
  np.savez(path, train=np.zeros((8, 4, 6, 1), np.uint8),
           test=np.zeros((2, 4, 6, 1), np.uint8))
  config = _data_config(dataset='npz', npz_path=str(path), augment=True)
  with pytest.raises(ValueError, match='square images.*4x6'):
    input_pipeline.train_batches(config, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)


# ----------------------------------------------------------------- evaluation


@pytest.mark.parametrize('num_examples,batch_size,process_count', [
    (None, 64, 1), (None, 64, 2), (297, 100, 4), (100, 32, 4), (1, 8, 2),
    (297, 297, 1), (50, 7, 1), (96, 48, 3)])
def test_eval_covers_every_example_once(num_examples, batch_size, process_count):
  config = _data_config(dataset='digits', augment=True)  # Ignored by eval.
  test = input_pipeline.load_split(config, 'test')
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
  config = _data_config(dataset='digits')
  with pytest.raises(ValueError, match='the test split has 297 images'):
    input_pipeline.eval_batches(config, 'test', global_batch_size=8,
                                num_examples=298, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='does not divide among 3 processes'):
    input_pipeline.eval_batches(config, 'test', global_batch_size=8,
                                process_index=0, process_count=3)
  train = list(input_pipeline.eval_batches(
      config, 'train', global_batch_size=500, process_index=0, process_count=1))
  assert sum(b['mask'].sum() for b in train) == 1500


# ------------------------------------------------------------------------ npz


def test_npz_happy_path(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
  test = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
  path = tmp_path / 'data.npz'
  np.savez(path, train=train, test=test)
  config = _data_config(dataset='npz', npz_path=str(path), augment=True)
  np.testing.assert_array_equal(input_pipeline.load_split(config, 'train'),
                                train[..., None])
  assert input_pipeline.dataset_info(config) == input_pipeline.DatasetInfo(
      name='npz', height=6, width=6, channels=1, vocab_size=256, num_train=40,
      num_test=10)
  batch = next(input_pipeline.train_batches(
      config, global_batch_size=8, seed=0, process_index=0, process_count=1))
  assert batch['images'].shape == (8, 6, 6, 1)

  rgb = tmp_path / 'rgb.npz'
  np.savez(rgb, train=np.zeros((4, 5, 7, 3), np.uint8),
           test=np.zeros((1, 5, 7, 3), np.uint8))
  info = input_pipeline.dataset_info(_data_config(dataset='npz', npz_path=str(rgb)))
  assert (info.height, info.width, info.channels) == (5, 7, 3)


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


_OK = np.zeros((4, 6, 6, 1), np.uint8)


@pytest.mark.parametrize('arrays,error,message', [
    (dict(train=_OK), ValueError, r"lacks the array\(s\) \['test'\].*test="),
    (dict(train=_OK.astype(np.float32), test=_OK), ValueError,
     r'dtype float32.*uint8.*astype\(np.uint8\)'),
    (dict(train=_OK, test=np.zeros((4, 36), np.uint8)), ValueError,
     r'shape \(4, 36\).*\[N, H, W, C\]'),
    (dict(train=np.zeros((4, 6, 6, 5), np.uint8), test=_OK), ValueError,
     r'C in 1..4'),
    (dict(train=_OK, test=np.zeros((4, 6, 6, 3), np.uint8)), ValueError,
     r'need the same \[H, W, C\]'),
    (dict(train=_OK, test=np.zeros((0, 6, 6, 1), np.uint8)), ValueError,
     r"'test'.*holds no images"),
])
def test_bad_npz_messages(tmp_path, arrays, error, message):
  config = _data_config(dataset='npz', npz_path=_write(tmp_path / 'x.npz', **arrays))
  with pytest.raises(error, match=message):
    input_pipeline.load_split(config, 'train')


def test_npz_path_errors(tmp_path):
  with pytest.raises(ValueError, match='needs data.npz_path'):
    input_pipeline.load_split(_data_config(dataset='npz'), 'train')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    input_pipeline.load_split(
        _data_config(dataset='npz', npz_path=str(tmp_path / 'no.npz')), 'train')
  single = tmp_path / 'single.npy'
  np.save(single, _OK)
  with pytest.raises(ValueError, match='not a .npz archive'):
    input_pipeline.load_split(
        _data_config(dataset='npz', npz_path=str(single)), 'train')


def test_npz_too_few_training_images(tmp_path):
  config = _data_config(dataset='npz',
                        npz_path=_write(tmp_path / 'x.npz', train=_OK, test=_OK))
  with pytest.raises(ValueError, match='has 4 training images.*batch size 8'):
    input_pipeline.train_batches(config, global_batch_size=8, seed=0,
                                 process_index=0, process_count=1)


# ----------------------------------------------------------------------- tfds


@pytest.fixture
def fresh_cache():
  input_pipeline.clear_cache()
  yield
  input_pipeline.clear_cache()


@pytest.mark.parametrize('random_access', [True, False])
@pytest.mark.parametrize('dataset,shape', [('cifar10', (32, 32, 3)),
                                           ('mnist', (28, 28, 1))])
def test_tfds_through_mock_data(tmp_path, fresh_cache, monkeypatch, dataset, shape,
                                random_access):
  """Both tfds paths: array_record read where indexed, TFRecord decoded whole."""
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _data_config(dataset=dataset, data_dir=str(tmp_path))
  if not random_access:
    monkeypatch.setattr(input_pipeline, '_open_tfds', lambda *args: None)
  with tfds.testing.mock_data(num_examples=24,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = input_pipeline.load_split(config, 'train')
    info = input_pipeline.dataset_info(config)
  assert train.shape == (24,) + shape and train.dtype == np.uint8
  assert info == input_pipeline.DatasetInfo(
      name=dataset, height=shape[0], width=shape[1], channels=shape[2],
      vocab_size=256, num_train=24, num_test=24)
  batch = next(input_pipeline.train_batches(
      config, global_batch_size=8, seed=0, process_index=1, process_count=2))
  assert batch['images'].shape == (4,) + shape
  evals = list(input_pipeline.eval_batches(
      config, 'test', global_batch_size=10, process_index=0, process_count=1))
  assert len(evals) == 3 and sum(b['mask'].sum() for b in evals) == 24


@pytest.mark.parametrize('augment', [False, True])
def test_tfds_random_access_reads_only_this_process_rows(tmp_path, fresh_cache,
                                                         monkeypatch, augment):
  """array_record (mocked): each process decodes exactly its rows; batches as for 1 process."""
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _data_config(dataset='cifar10', data_dir=str(tmp_path), augment=augment)
  reads = []
  read = input_pipeline.RandomAccessImages._read
  monkeypatch.setattr(input_pipeline.RandomAccessImages, '_read',
                      lambda self, i: reads.append(i) or read(self, i))
  with tfds.testing.mock_data(num_examples=24,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = input_pipeline.open_split(config, 'train')
    assert isinstance(train, input_pipeline.RandomAccessImages)
    assert train.shape == (24, 32, 32, 3) and not reads
    whole = train[np.arange(24)]
    reads.clear()
    # Steps 2..4 of batch 10 straddle the 24-image epochs.
    one = _take(input_pipeline.train_batches(
        config, global_batch_size=10, seed=3, start_step=2, process_index=0,
        process_count=1), 3)
    order = list(reads)
    assert len(order) == 30 and sorted(set(order[:10])) != list(range(10))
    shares = []
    for p in range(2):
      reads.clear()
      shares.append(_take(input_pipeline.train_batches(
          config, global_batch_size=10, seed=3, start_step=2, process_index=p,
          process_count=2), 3))
      assert reads == [i for k in range(3) for i in order[10 * k + 5 * p:10 * k + 5 * p + 5]]
    for k in range(3):
      np.testing.assert_array_equal(
          np.concatenate([shares[0][k]['images'], shares[1][k]['images']]),
          one[k]['images'])
      if not augment:
        np.testing.assert_array_equal(one[k]['images'], whole[order[10 * k:10 * k + 10]])
    reads.clear()
    evals = list(input_pipeline.eval_batches(
        config, 'test', global_batch_size=10, process_index=1, process_count=2))
  assert reads == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]  # Padding rows 25..29 unread.
  assert [int(b['mask'].sum()) for b in evals] == [5, 5, 0]


def test_real_array_record_dataset(tmp_path, fresh_cache, monkeypatch):
  """A tfds dataset really prepared as array_record (no mock) is read where indexed."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class VdmTestImages(tfds.core.GeneratorBasedBuilder):  # Image i is filled with i.
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {'image': tfds.features.Image(shape=(28, 28, 1))}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples(0, 40),
              'test': self._generate_examples(40, 52)}

    def _generate_examples(self, start, stop):
      for i in range(start, stop):
        yield i, {'image': np.full((28, 28, 1), i, np.uint8)}

  VdmTestImages(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  monkeypatch.setitem(input_pipeline._TFDS_SOURCES, 'mnist', input_pipeline._TfdsSource(
      'vdm_test_images', {'train': 'train', 'test': 'test'}, (28, 28, 1)))
  config = _data_config(dataset='mnist', data_dir=str(tmp_path))
  train = input_pipeline.open_split(config, 'train')
  assert isinstance(train, input_pipeline.RandomAccessImages)
  values = train[np.arange(40)][:, 0, 0, 0]
  assert sorted(values) == list(range(40))
  np.testing.assert_array_equal(input_pipeline.load_split(config, 'train')[:, 0, 0, 0],
                                values)
  assert input_pipeline.dataset_info(config).num_test == 12
  batch = next(input_pipeline.eval_batches(config, 'test', global_batch_size=16,
                                           process_index=0, process_count=1))
  assert sorted(batch['images'][batch['mask'], 0, 0, 0]) == list(range(40, 52))
  config.num_train = 10
  assert input_pipeline.open_split(config, 'train').shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(input_pipeline.load_split(config, 'train')[:, 0, 0, 0],
                                values[:10])
  config.num_train = 41
  with pytest.raises(ValueError, match='num_train=41 exceeds the 40 training images'):
    input_pipeline.open_split(config, 'train')


def test_random_access_images_checks_records():
  good = {'image': np.zeros((4, 4, 1), np.uint8)}
  images = input_pipeline.RandomAccessImages(
      [good, {'image': np.zeros((4, 5, 1), np.uint8)},
       {'image': np.zeros((4, 4, 1), np.int32)}], (4, 4, 1), 'mnist train')
  assert len(images) == 3 and images[np.array([0, 0])].shape == (2, 4, 4, 1)
  with pytest.raises(ValueError, match=r'mnist train: record 1 .* shape \(4, 5, 1\)'):
    images[np.array([0, 1])]
  with pytest.raises(ValueError, match='record 2 holds a int32 image'):
    images[np.array([2])]
  with pytest.raises(IndexError, match='index 3 out of range'):
    images[np.array([3])]
  with pytest.raises(TypeError, match='integer indices'):
    images[np.array([0.0])]


def test_tfrecord_tfds_falls_back_to_whole_split(monkeypatch, caplog):
  monkeypatch.setattr(input_pipeline, '_open_tfds', lambda *args: None)
  whole = np.zeros((3, 32, 32, 3), np.uint8)
  monkeypatch.setattr(input_pipeline, 'load_split', lambda config, split: whole)
  config = _data_config(dataset='cifar10')
  assert input_pipeline.open_split(config, 'train') is whole
  assert 'file_format=array_record' not in caplog.text  # One process: nothing to say.
  monkeypatch.setattr(input_pipeline.jax, 'process_count', lambda: 2)
  with caplog.at_level('WARNING'):
    assert input_pipeline.open_split(config, 'test') is whole
  assert 'every process loads the whole test split' in caplog.text
  assert 'tfds build cifar10 --file_format=array_record' in caplog.text


def test_tfds_not_prepared_says_how(tmp_path, fresh_cache):
  pytest.importorskip('tensorflow_datasets')
  config = _data_config(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not prepared in') as e:
    input_pipeline.load_split(config, 'test')
  assert 'download_and_prepare()' in str(e.value)
  assert (f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record'
          in str(e.value))
  with pytest.raises(FileNotFoundError, match='not prepared in'):  # No data source either.
    next(input_pipeline.eval_batches(config, 'test', global_batch_size=8))


@pytest.mark.parametrize('dataset,res', [('downsampled_imagenet32', '32x32'),
                                         ('downsampled_imagenet64', '64x64')])
def test_imagenet_missing_files_says_where(tmp_path, fresh_cache, dataset, res):
  pytest.importorskip('tensorflow_datasets')
  config = _data_config(dataset=dataset, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    input_pipeline.load_split(config, 'train')
  message = str(e.value)
  manual = str(tmp_path / 'downloads' / 'manual')
  for needed in (f'train_{res}.tar', f'valid_{res}.tar', manual,
                 f"DownloadConfig(manual_dir='{manual}')",
                 f'downsampled_imagenet/{res}', 'imagenet_resized'):
    assert needed in message
