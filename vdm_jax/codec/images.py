"""Image files of the codec commands: a .npz array, or a folder of PNG files read as the
pixels a viewer shows and written back the same.

A PNG is read with the channels its mode needs to show every pixel exactly:

  mode                                  channels
  1 (black and white), L (grey)         1: 0..255 (1-bit pixels are 0 or 255)
  LA (grey and alpha)                   2
  P (palette)                           its colours, not its indices: 1 if every colour
                                        used is grey, else 3; +1 with transparency
  RGB, RGBA                             3, 4
  L or RGB with a transparent colour    +1 (alpha)

Every other PNG is refused with its mode and what to convert it to, rather than
narrowed: 16-bit samples (mode I;16, and 48- or 64-bit colour, which Pillow would cut
to 8 bits), 32-bit integer or float modes, animated PNGs. Decoded images are written
as 1 → L, 2 → LA, 3 → RGB, 4 → RGBA, so a decoded folder shows the pixels of the
folder that was coded, pixel for pixel.
"""

import os
from typing import Optional
import zipfile
import zlib

import numpy as np
from PIL import Image

from vdm_jax.codec import file_format

PNG_MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}  # channels -> the mode written
KINDS = {1: 'greyscale', 2: 'greyscale with alpha', 3: 'colour', 4: 'colour with alpha'}
_READ_AS_RGBA = ('1', 'L', 'LA', 'P', 'RGB', 'RGBA')  # modes read through RGBA
_CHANNELS = {'1': (0,), 'L': (0,), 'LA': (0, 3), 'RGB': (0, 1, 2), 'RGBA': (0, 1, 2, 3)}
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


# PNG colour types (the IHDR chunk) -> what they hold, and the 8-bit mode that holds it.
_COLOUR_TYPES = {0: ('greyscale', 'L'), 2: ('RGB', 'RGB'), 3: ('palette', 'P'),
                 4: ('greyscale and alpha', 'LA'), 6: ('RGBA', 'RGBA')}


def _ihdr(path: str) -> tuple[int, int]:
  """(bit depth, colour type) of a PNG file, bytes 24 and 25 (its IHDR chunk)."""
  with open(path, 'rb') as f:
    head = f.read(26)
  return (head[24], head[25]) if head.startswith(_PNG_SIGNATURE) and len(head) == 26 else (8, 0)


def _refuse(path: str, what: str, convert_to: str) -> file_format.CodecError:
  return file_format.CodecError(
      f'{path} is {what}; the codec reads 8-bit PNG files exactly and would have to '
      f'change these pixels. Convert it to {convert_to} first (e.g. with Pillow, or '
      'ImageMagick `convert IN -depth 8 OUT`).')


def _channels(image: Image.Image, rgba: np.ndarray) -> tuple:
  """Which of R, G, B, A show this image's pixels exactly (see the module docstring)."""
  mode = image.mode
  transparent = 'transparency' in image.info
  if mode == 'P':
    grey = (np.array_equal(rgba[..., 0], rgba[..., 1])
            and np.array_equal(rgba[..., 0], rgba[..., 2]))
    colour = (0,) if grey else (0, 1, 2)
    return colour + (3,) if transparent else colour
  channels = _CHANNELS[mode]
  if transparent and mode in ('L', 'RGB'):
    channels += (3,)
  return channels


def read_png(path: str) -> np.ndarray:
  """uint8 [H, W, C]: the pixels a viewer shows, or a CodecError naming the mode."""
  try:
    with Image.open(path) as image:
      if image.format != 'PNG':
        raise file_format.CodecError(f'{path} is a {image.format} file, not a PNG.')
      if getattr(image, 'n_frames', 1) > 1:
        raise file_format.CodecError(
            f'{path} is an animated PNG ({image.n_frames} frames); save each frame as a '
            'PNG file of its own.')
      depth, colour_type = _ihdr(path)
      if depth == 16:
        holds, target = _COLOUR_TYPES.get(colour_type, ('unknown', 'L'))
        raise _refuse(path, f'a 16-bit {holds} PNG (Pillow mode {image.mode})',
                      f'8 bits per sample (mode {target})')
      if image.mode not in _READ_AS_RGBA:
        raise _refuse(path, f'a PNG of mode {image.mode}', '8-bit greyscale (mode L) or '
                      'colour (mode RGB)')
      rgba = np.asarray(image.convert('RGBA'))
      return np.ascontiguousarray(rgba[..., list(_channels(image, rgba))])
  except (OSError, SyntaxError, ValueError, zlib.error) as e:
    raise file_format.CodecError(f'{path} cannot be read as a PNG file '
                                 f'({type(e).__name__}: {e}).') from e


def write_png(image: np.ndarray, path: str) -> None:
  """Writes uint8 [H, W, C], C in 1..4, in the mode of PNG_MODES."""
  channels = image.shape[-1]
  pixels = image[..., 0] if channels == 1 else image
  Image.fromarray(np.asarray(pixels, np.uint8), PNG_MODES[channels]).save(path, 'PNG')


def load_images(path: str, split: str = 'test', shown: Optional[str] = None) -> np.ndarray:
  """[N, H, W, C] from a .npz (array `images`, else `split`) or a folder of PNG files;
  a CodecError naming the file (as `shown`, default `path`: a local copy is named by
  its original) and what is wrong when it cannot be read as images."""
  shown = shown or path
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.lower().endswith('.png'))
    if not names:
      raise file_format.CodecError(f'--input={shown} holds no .png files.')
    arrays = [read_png(os.path.join(path, n)) for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
      raise file_format.CodecError(
          f'The PNG files in --input={shown} differ in shape (height, width, channels): '
          f'{sorted(shapes)}; the codec codes images of one shape per file.')
    return np.stack(arrays)
  try:
    with np.load(path, allow_pickle=False) as npz:
      key = 'images' if 'images' in npz.files else split
      if key not in npz.files:
        raise file_format.CodecError(
            f'--input={shown} has arrays {npz.files}; expected `images` or `{split}` '
            '(integers [N, H, W, C]).')
      images = npz[key]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise file_format.CodecError(
        f'--input={shown} is not a readable .npz file ({type(e).__name__}: {e}). Write '
        'images with numpy.savez(path, images=array), an integer array [N, H, W, C].') from e
  return images[..., None] if images.ndim == 3 else images


def save_npz(images: np.ndarray, path: str) -> None:
  """A .npz holding the array `images` (at `path`, whatever its name)."""
  with open(path, 'wb') as f:
    np.savez(f, images=images)


def save_pngs(images: np.ndarray, folder: str) -> None:
  """000000.png, 000001.png, … in `folder` (made if missing; same names replaced)."""
  os.makedirs(folder, exist_ok=True)
  for i, image in enumerate(images):
    write_png(image, os.path.join(folder, f'{i:06d}.png'))


def save_images(images: np.ndarray, path: str) -> str:
  """To a .npz (array `images`) or, for any other path, a folder of PNG files."""
  (save_npz if path.endswith('.npz') else save_pngs)(images, path)
  return path
