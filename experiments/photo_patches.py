r"""A folder of photographs as an .npz of P×P colour patches, train and test apart.

  python experiments/photo_patches.py --photos=~/Pictures --output=photo_patches.npz
  python -m vdm_jax.main --config=configs/photo_patches.py --workdir=workdirs/photos

Reads every file in --photos that Pillow opens as a picture (sorted by name; colour
with alpha or a palette becomes RGB, grey stays grey only with --channels=1) and cuts
it into P×P patches. Train and test never share a pixel:

  --split=region  each photograph is tiled into blocks of --block pixels; a fixed
                  pseudo-random --test_fraction of the blocks (seeded by --seed and the
                  photograph's name) gives the test patches, the rest the training
                  patches. Patches lie inside one block each, so the two splits are
                  separate regions of the same photographs.
  --split=photo   the last --test_fraction of the photographs (at least one) give the
                  test patches, the others the training patches.

Test patches tile their region without overlap; training patches are cut every
--train_stride pixels (overlapping when it is below P, for more of them). Writes
uint8 'train' and 'test' [N, P, P, C], and for each patch its photograph's index and
top-left corner ('train_origin', 'test_origin', int32 [N, 3]) and the photographs'
names ('photos'), the form data.dataset=npz reads.

To try it without photographs of your own, --photos=matplotlib takes the pictures
shipped in matplotlib's mpl-data/sample_data (a 512×600 photograph, a 128×128 drawing
and a 542×130 logo).
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
from PIL import Image
# pylint: enable=g-import-not-at-top,wrong-import-position


def matplotlib_samples() -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  return os.path.join(matplotlib.get_data_path(), 'sample_data')


def load_photos(folder: str, channels: int = 3) -> list:
  """[(name, uint8 [H, W, channels])] of every picture in the folder, sorted by name."""
  if channels not in (1, 3):
    raise ValueError(f'channels={channels}: 3 (RGB) or 1 (grey).')
  folder = matplotlib_samples() if folder == 'matplotlib' else os.path.expanduser(folder)
  photos = []
  for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    try:
      with Image.open(path) as im:
        photos.append((name, np.asarray(im.convert('RGB' if channels == 3 else 'L'))))
    except (OSError, ValueError):  # not a picture (Pillow's UnidentifiedImageError too)
      continue
  if not photos:
    raise ValueError(f'{folder} holds no picture that Pillow can open.')
  return [(n, p.reshape(p.shape[:2] + (channels,))) for n, p in photos]


def _tiles(photo: np.ndarray, top: int, left: int, height: int, width: int, size: int,
           stride: int) -> list:
  """[(row, col)] of the size×size patches inside the rectangle, every stride pixels."""
  return [(r, c) for r in range(top, top + height - size + 1, stride)
          for c in range(left, left + width - size + 1, stride)
          if r + size <= photo.shape[0] and c + size <= photo.shape[1]]


def _is_test_block(name: str, bi: int, bj: int, seed: int, fraction: float) -> bool:
  key = f'{seed}/{name}/{bi}/{bj}'.encode()
  return int.from_bytes(hashlib.sha256(key).digest()[:8], 'little') < fraction * 2.0**64


def cut(photos: list, size: int = 16, split: str = 'region', test_fraction: float = 0.2,
        block: int = 64, train_stride: int = 16, seed: int = 0) -> dict:
  """{'train', 'test': uint8 [N, P, P, C], 'train_origin', 'test_origin': int32 [N, 3]
  (photograph, row, column), 'photos': names}; see the module's docstring."""
  if split not in ('region', 'photo'):
    raise ValueError(f"split={split!r}: 'region' or 'photo'.")
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction={test_fraction} must lie between 0 and 1.')
  if block < size or train_stride < 1:
    raise ValueError(f'block={block} must be at least the patch size {size}, and '
                     f'train_stride={train_stride} at least 1.')
  origins = {'train': [], 'test': []}
  test_photos = max(1, round(test_fraction * len(photos)))
  for index, (name, photo) in enumerate(photos):
    h, w = photo.shape[:2]
    if split == 'photo':
      which = 'test' if index >= len(photos) - test_photos else 'train'
      stride = size if which == 'test' else train_stride
      origins[which] += [(index, r, c) for r, c in _tiles(photo, 0, 0, h, w, size, stride)]
      continue
    for bi in range(0, h, block):
      for bj in range(0, w, block):
        test = _is_test_block(name, bi // block, bj // block, seed, test_fraction)
        stride = size if test else train_stride
        origins['test' if test else 'train'] += [
            (index, r, c) for r, c in _tiles(photo, bi, bj, block, block, size, stride)]
  out = {'photos': np.array([name for name, _ in photos])}
  for which, where in origins.items():
    if not where:
      raise ValueError(f'No {which} patch: too few or too small photographs for '
                       f'{size}x{size} patches in blocks of {block} (test_fraction '
                       f'{test_fraction}).')
    out[which] = np.stack([photos[i][1][r:r + size, c:c + size] for i, r, c in where])
    out[f'{which}_origin'] = np.asarray(where, np.int32)
  return out


def _define_flags() -> None:
  flags.DEFINE_string('photos', None, 'Folder of photographs; "matplotlib" for the '
                      'pictures shipped with matplotlib.')
  flags.DEFINE_string('output', 'photo_patches.npz', 'The .npz file to write (the one '
                      'configs/photo_patches.py reads).')
  flags.DEFINE_integer('size', 16, 'P: patches are P×P.')
  flags.DEFINE_enum('split', 'region', ['region', 'photo'], 'Test patches from separate '
                    'regions of every photograph, or from separate photographs.')
  flags.DEFINE_float('test_fraction', 0.2, 'Share of the blocks (or photographs) for test.')
  flags.DEFINE_integer('block', 64, 'Side of the blocks that --split=region assigns.')
  flags.DEFINE_integer('train_stride', 16, 'Pixels between training patches.')
  flags.DEFINE_integer('channels', 3, '3 (RGB) or 1 (grey).')
  flags.DEFINE_integer('seed', 0, 'Seeds which blocks are test blocks.')
  flags.mark_flags_as_required(['photos'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    photos = load_photos(f.photos, f.channels)
    arrays = cut(photos, f.size, f.split, f.test_fraction, f.block, f.train_stride, f.seed)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  np.savez(f.output, **arrays)
  print(f"{len(photos)} photographs -> {len(arrays['train'])} training and "
        f"{len(arrays['test'])} test patches {arrays['test'].shape[1:]} in {f.output}")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
