"""vdm_jax/codec/conventional.py: every conventional code decodes back exactly, on grey,
colour and alpha images of odd sizes; a set of images gets the shortest of them; bytes
that are not a code of the images described are refused."""

import numpy as np
import pytest

from vdm_jax.codec import conventional


def smooth_images(n, shape, seed=0):
  """Photograph-like uint8 images: smooth gradients plus a little noise."""
  rng = np.random.default_rng(seed)
  h, w, c = shape
  y, x = np.mgrid[:h, :w]
  base = 100 + 3 * y[None, :, :, None] + 2 * x[None, :, :, None] + 20 * np.arange(c)
  return np.clip(base + rng.integers(-2, 3, (n, h, w, c)), 0, 255).astype(np.uint8)


def noise_images(n, shape, vocab_size=256, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, (n,) + shape)


SHAPES = [(28, 28, 1), (8, 8, 1), (16, 16, 3), (5, 9, 3), (7, 6, 2), (6, 5, 4)]


@pytest.mark.parametrize('codec', list(conventional.CODECS))
@pytest.mark.parametrize('shape', SHAPES)
def test_each_codec_round_trips_one_image(codec, shape):
  for image in (smooth_images(1, shape)[0], noise_images(1, shape)[0].astype(np.uint8)):
    data = conventional.encode(image, codec)
    np.testing.assert_array_equal(conventional.decode(data, shape[-1]), image)


@pytest.mark.parametrize('shape', SHAPES)
def test_every_method_of_a_set_round_trips(shape):
  """Each candidate code of n images as one picture, not only the shortest."""
  for images in (smooth_images(3, shape), noise_images(3, shape)):
    methods = []
    for method, data in conventional.candidates(images, 256):
      decoded = conventional.decode_set(method, data, 3, shape, 256)
      np.testing.assert_array_equal(decoded, images)
      assert decoded.dtype == np.int64
      methods.append(method)
    assert methods == [conventional.JPEGXL, conventional.WEBP, conventional.PNG,
                       conventional.RAW]


def test_the_set_code_is_the_shortest_candidate():
  for images in (smooth_images(4, (16, 16, 3)), noise_images(4, (8, 8, 1), 17),
                 np.full((2, 8, 8, 1), 7)):
    sizes = {m: len(d) for m, d in conventional.candidates(images, 256)}
    method, data = conventional.encode_set(images, 256)
    assert len(data) == min(sizes.values()) and sizes[method] == len(data), sizes
  # JPEG XL is the shortest on smooth colour images, raw on uniform noise.
  assert conventional.encode_set(smooth_images(4, (16, 16, 3)), 256)[0] == (
      conventional.JPEGXL)
  assert conventional.encode_set(noise_images(4, (8, 8, 1)), 256)[0] == conventional.RAW


def test_values_above_255_are_raw_two_bytes_each():
  images = noise_images(2, (4, 4, 1), 1000)
  method, data = conventional.encode_set(images, 1000)
  assert (method, len(data)) == (conventional.RAW, 2 * 2 * 16)
  np.testing.assert_array_equal(conventional.decode_set(method, data, 2, (4, 4, 1), 1000),
                                images)


@pytest.mark.parametrize('method', [conventional.JPEGXL, conventional.WEBP,
                                    conventional.PNG, conventional.RAW])
def test_bytes_of_other_images_or_damaged_are_refused(method):
  images = smooth_images(2, (8, 8, 3))
  data = dict(conventional.candidates(images, 256))[method]
  for bad in (data[:len(data) // 2], b'', b'\x00' * 7):
    with pytest.raises(conventional.ConventionalDecodeError):
      conventional.decode_set(method, bad, 2, (8, 8, 3), 256)
  with pytest.raises(conventional.ConventionalDecodeError):  # another image shape
    conventional.decode_set(method, data, 1, (8, 8, 3), 256)
  with pytest.raises(conventional.ConventionalDecodeError):  # values above V − 1
    conventional.decode_set(method, data, 2, (8, 8, 3), 17)


def test_an_unknown_method_is_refused():
  with pytest.raises(conventional.ConventionalDecodeError, match='unknown method 9'):
    conventional.decode_set(9, b'\x00' * 16, 1, (4, 4, 1), 256)
