"""Conventional lossless codes of images: JPEG XL lossless (imagecodecs/libjxl), WebP
lossless and PNG (Pillow), raw bytes.

The bits-back codec (docs/maths.md §9) keeps a set of images in one of these codes when
that is shorter than the model's, and codes the first images of a file with them to
give the first pops their bits. A set of images [n, H, W, C] is coded as one picture,
the images stacked vertically ([n·H, W, C]); `encode_set` returns the shortest code that
decodes back exactly:

    method, data = conventional.encode_set(images, vocab_size)
    images = conventional.decode_set(method, data, n, (H, W, C), vocab_size)
"""

import io
import math
import struct

import imagecodecs
import numpy as np
from PIL import Image

MODES = {1: 'L', 2: 'LA', 3: 'RGB', 4: 'RGBA'}  # channels -> PIL mode
CODECS = {
    'PNG': ('PNG', dict(optimize=True, compress_level=9),
            'Pillow, optimize=True, compress_level=9'),
    # exact=True keeps the colour under transparent pixels (lossless for every RGBA).
    'WebP lossless': ('WEBP', dict(lossless=True, quality=100, method=6, exact=True),
                      'Pillow/libwebp, lossless=True, quality=100, method=6, exact=True'),
    'JPEG XL lossless': ('JPEGXL', dict(lossless=True, effort=9),
                         'imagecodecs/libjxl, lossless=True, effort=9'),
}
WEBP_MAX_SIDE = 16383  # libwebp's largest picture side

# Method numbers stored in a file (file_format.Header.conventional); JPEG XL from
# format version 3 on.
WEBP, PNG, RAW, JPEGXL = 1, 2, 3, 4
NAMES = {WEBP: 'WebP lossless', PNG: 'PNG', RAW: 'raw', JPEGXL: 'JPEG XL lossless'}
_RIFF_HEAD = struct.Struct('<4sI4s4sI')  # 'RIFF', size, 'WEBP', 'VP8L', chunk size
_JXL_SIGNATURE = b'\xff\x0a'  # the start of a bare JPEG XL codestream
_JXL_CONTAINER = b'\0\0\0\x0cJXL '  # the start of a JPEG XL file in boxes


class ConventionalDecodeError(ValueError):
  """Bytes that are not a code of the images described."""


def encode(image: np.ndarray, codec: str) -> bytes:
  """One uint8 [H, W, C] image as a complete file of the codec."""
  fmt, options, _ = CODECS[codec]
  plane = image.reshape(image.shape[:2]) if image.shape[-1] == 1 else image
  if fmt == 'JPEGXL':
    return imagecodecs.jpegxl_encode(np.ascontiguousarray(plane), **options)
  out = io.BytesIO()
  Image.fromarray(plane, MODES[image.shape[-1]]).save(out, format=fmt, **options)
  return out.getvalue()


def decode(data: bytes, channels: int) -> np.ndarray:
  """A file back to uint8 [H, W, C] (WebP stores grey as RGB, grey+alpha as RGBA)."""
  if data.startswith((_JXL_SIGNATURE, _JXL_CONTAINER)):
    try:
      array = np.asarray(imagecodecs.jpegxl_decode(data))
    except RuntimeError as e:  # imagecodecs.JpegxlError and others
      raise ValueError(f'JPEG XL: {e}') from e
  else:
    with Image.open(io.BytesIO(data)) as im:
      array = np.asarray(im)
  if array.ndim == 2:
    array = array[..., None]
  if array.shape[-1] != channels:
    array = array[..., [0, 3] if channels == 2 else [0]]
  return array


def _strip(images: np.ndarray) -> np.ndarray:
  n, h, w, c = images.shape
  return images.reshape(n * h, w, c)


def _webp_body(data: bytes):
  """The VP8L bitstream of a simple lossless WebP file, or None for another layout."""
  riff, size, webp, chunk, length = _RIFF_HEAD.unpack_from(data)
  if (riff, webp, chunk) != (b'RIFF', b'WEBP', b'VP8L') or size != len(data) - 8:
    return None
  return data[_RIFF_HEAD.size:_RIFF_HEAD.size + length]


def _webp_file(body: bytes) -> bytes:
  """The RIFF container around a VP8L bitstream (padded to an even size)."""
  pad = b'\0' * (len(body) % 2)
  return _RIFF_HEAD.pack(b'RIFF', 12 + len(body) + len(pad), b'WEBP', b'VP8L',
                         len(body)) + body + pad


def _jxl_file(body: bytes) -> bytes:
  return _JXL_SIGNATURE + body


# Each picture method's stored bytes -> a complete file of its codec.
_FILES = {WEBP: _webp_file, PNG: bytes, JPEGXL: _jxl_file}


def candidates(images: np.ndarray, vocab_size: int):
  """(method, bytes) of each code that applies to integer images [n, H, W, C], all n as
  one picture, in the order JPEG XL, WebP, PNG, raw (not checked by decoding)."""
  n, h, w, c = images.shape
  if vocab_size <= 256 and c in MODES:
    strip = _strip(images.astype(np.uint8))
    jxl = encode(strip, 'JPEG XL lossless')
    if jxl.startswith(_JXL_SIGNATURE):  # stored without its signature
      yield JPEGXL, jxl[len(_JXL_SIGNATURE):]
    if n * h <= WEBP_MAX_SIDE and w <= WEBP_MAX_SIDE:
      body = _webp_body(encode(strip, 'WebP lossless'))
      if body is not None:
        yield WEBP, body
    yield PNG, encode(strip, 'PNG')
  yield RAW, _raw(images, vocab_size)


def _raw(images: np.ndarray, vocab_size: int) -> bytes:
  return np.ascontiguousarray(images, '<u2' if vocab_size > 256 else np.uint8).tobytes()


def encode_set(images: np.ndarray, vocab_size: int) -> tuple[int, bytes]:
  """(method, bytes): the shortest code of integer images [n, H, W, C] that decodes back
  to them exactly (each code is decoded once here to make sure)."""
  best = None
  for method, data in candidates(images, vocab_size):
    if best is None or len(data) < len(best[1]):
      try:
        exact = np.array_equal(decode_set(method, data, len(images), images.shape[1:],
                                          vocab_size), images)
      except ConventionalDecodeError:
        exact = False
      if exact:
        best = method, data
  return best


def decode_set(method: int, data: bytes, n: int, shape, vocab_size: int) -> np.ndarray:
  """The n images [n, H, W, C] (int64) of a code written by `encode_set`."""
  h, w, c = shape
  try:
    if method == RAW:
      array = np.frombuffer(data, '<u2' if vocab_size > 256 else np.uint8)
      if array.size != n * h * w * c:
        raise ConventionalDecodeError(f'{len(data)} raw bytes for {n} images {shape}')
    elif method in _FILES:
      array = decode(_FILES[method](data), c)
      if array.shape != (n * h, w, c):
        raise ConventionalDecodeError(f'a picture {array.shape}, not {n} images {shape}')
    else:
      raise ConventionalDecodeError(f'unknown method {method}')
  except (OSError, ValueError, IndexError, struct.error) as e:  # IndexError: other channels
    raise ConventionalDecodeError(str(e)) from e
  images = array.reshape((n, h, w, c)).astype(np.int64)
  if images.max(initial=0) >= vocab_size:
    raise ConventionalDecodeError(f'values above {vocab_size - 1}')
  return images


def bits_per_dim(data: bytes, n: int, shape) -> float:
  return 8 * len(data) / (n * math.prod(shape))
