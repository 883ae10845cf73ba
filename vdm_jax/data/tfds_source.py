"""tensorflow-datasets splits: random access where the files allow it, else whole.

A registry entry of vdm_jax/data/datasets.py names the tfds builder (`tfds_name`), its
splits and the image shape; the functions here read what it names. Datasets prepared
as array_record are read a row at a time (RandomAccessImages), so that each process
reads only its share of a batch; TFRecord files are decoded whole.
"""

import os
from typing import Optional

import numpy as np


def _tfds_root(data_dir: Optional[str]) -> str:
  if data_dir:
    return data_dir
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.fspath(tfds.core.constants.get_default_data_dir())


def not_prepared_message(entry, dataset: str, data_dir: Optional[str]) -> str:
  """What to do when the tfds dataset of registry `entry` is not prepared in data_dir."""
  name, root = entry.tfds_name, _tfds_root(data_dir)
  prepare = ('  python -c "import tensorflow_datasets as tfds; '
             f"tfds.builder('{name}', data_dir='{root}', file_format='array_record')"
             '.download_and_prepare({})"\n')
  if dataset.startswith('downsampled_imagenet'):
    res = name.split('/')[1]
    manual = os.path.join(root, 'downloads', 'manual')
    return (
        f'{dataset}: the original downsampled ImageNet ({res}, van den Oord et al. 2016) '
        f'is not prepared in {root}. Its download links are dead, so place the original '
        f'files train_{res}.tar and valid_{res}.tar (formerly http://image-net.org/small/; '
        f'tfds checks their sha256) in {manual}/ and prepare them once with\n'
        + prepare.format('download_config=tfds.download.DownloadConfig('
                         f"manual_dir='{manual}')")
        + f'or, where apache_beam is installed, `tfds build {name} --data_dir={root} '
        f'--manual_dir={manual} --file_format=array_record` (array_record lets each '
        'process read only its share). Do not substitute imagenet_resized: it is a '
        'different, easier dataset (docs/maths.md §8).')
  return (
      f'{dataset}: tfds dataset {name!r} is not prepared in {root}. On a machine with '
      'network access prepare it once with\n' + prepare.format('')
      + f'(or `tfds build {name} --data_dir={root} --file_format=array_record`), then copy '
      f'{os.path.join(root, name)} here, or set data.data_dir to the folder that holds it. '
      '(array_record lets each process read only its share of each batch; the default '
      'TFRecord format makes every process load the whole split.)')


class RandomAccessImages:
  """A tfds split in a random-access format, read and decoded only where indexed.

  Behaves like the read-only uint8 array [N, H, W, C] of the split for what the batch
  iterators use: len(), .shape, and images[int_indices] -> a new uint8 array.
  """

  def __init__(self, source, image_shape: tuple, where: str, limit: Optional[int] = None,
               start: int = 0):
    """`source[start + i]['image']` is image i; only records before `limit` are used
    (None: all)."""
    self._source = source
    self._image_shape = tuple(image_shape)
    self._where = where
    self._start = start
    count = (len(source) if limit is None else min(limit, len(source))) - start
    self.shape = (count,) + self._image_shape

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, index: int) -> np.ndarray:
    return np.asarray(self._source[self._start + index]['image'])

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
            f'{image.shape}, expected uint8 {self._image_shape}; rebuild the dataset with '
            'tfds.')
      out[row] = image
    return out


def open_random_access(entry, dataset: str, split: str, data_dir: Optional[str]
                       ) -> Optional[RandomAccessImages]:
  """The split as RandomAccessImages, or None where its file format has no random access."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(entry.tfds_name, data_dir=data_dir)
  try:
    records = builder.as_data_source(split=entry.tfds_splits[split])
  except (NotImplementedError, ValueError):  # TFRecord, or not prepared at all
    return None
  if len(records) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f'{dataset} {split}: the split holds no images; rebuild it with '
                     f'`tfds build {entry.tfds_name} --file_format=array_record`.')
  return RandomAccessImages(records, entry.shape, f'{dataset} {split}')


def load_whole(entry, dataset: str, split: str, data_dir: Optional[str]) -> np.ndarray:
  """Decodes one TFRecord tfds split, in its fixed order, into uint8 [N, H, W, C]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds_split = entry.tfds_splits[split]
  builder = tfds.builder(entry.tfds_name, data_dir=data_dir)
  try:
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  except AssertionError as e:  # tfds: "could not find data in <data_dir>"
    raise FileNotFoundError(not_prepared_message(entry, dataset, data_dir)) from e
  ds = ds.map(lambda ex: tf.ensure_shape(ex['image'], entry.shape),
              num_parallel_calls=tf.data.AUTOTUNE).batch(4096).prefetch(2)
  try:  # preallocate where tfds knows the size (ImageNet would not fit twice)
    total = builder.info.splits[tfds_split].num_examples
  except (KeyError, ValueError, AttributeError):
    total = None
  if total:
    images, n = np.empty((total,) + entry.shape, np.uint8), 0
    for chunk in tfds.as_numpy(ds):
      images[n:n + len(chunk)] = chunk
      n += len(chunk)
    if n != total:
      raise ValueError(f'{dataset} {split}: tfds promised {total} images but gave {n}; '
                       f'rebuild it with `tfds build {entry.tfds_name}`.')
  else:
    images = np.concatenate(list(tfds.as_numpy(ds)), axis=0)
  return images


def split_counts(entry, data_dir: Optional[str], splits=('train', 'test')
                 ) -> Optional[list[int]]:
  """Split sizes from tfds' metadata; None where it has none (not prepared, mocked)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  known = tfds.builder(entry.tfds_name, data_dir=data_dir).info.splits
  names = [entry.tfds_splits[s] for s in splits]
  return [known[n].num_examples for n in names] if all(n in known for n in names) else None
