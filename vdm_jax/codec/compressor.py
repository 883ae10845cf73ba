"""Files of images: bits-back coding above a conventional code of the first images (§9).

    data, report = compressor.compress(model, params, images, timesteps=400)
    images = compressor.decompress(model, params, data)

A file holds the first k images in a conventional lossless code (conventional.py) and
the other N − k bits-back coded (coder.py) on an ANS stack whose bottom is that code:
the first pops of the bits-back images read the conventional bytes instead of fresh
random bits, and decoding the bits-back images restores them (docs/maths.md §9). k is
the fewest images whose code covers the first group's expected dip. When a
conventional code of all N images is shorter, the file holds that instead, so no file
is longer than the conventional code plus the header.
"""

import contextlib
import math
import time
from typing import Optional

import flax
import numpy as np
import tqdm

from vdm_jax.codec import coder
from vdm_jax.codec import conventional
from vdm_jax.codec import file_format
from vdm_jax.codec import fingerprints
from vdm_jax.codec import steps
from vdm_jax.codec import tables
from vdm_jax.runtime import compiler

_WHITENING = b'vdm_jax conventional bytes'  # keystream label for the stacked code
DENSITY_IMAGES = 256  # the first images, at most, on which a step density is estimated


def check_images(images, vocab_size: int) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.integer) or not images.size:
    raise file_format.CodecError(
        f'images must be a non-empty integer array [N, H, W, C] (each of N, H, W, C at '
        f'least 1), got {images.dtype} {images.shape}.')
  if images.min() < 0 or images.max() >= vocab_size:
    raise file_format.CodecError(
        f'image values must lie in 0..{vocab_size - 1} (the model\'s vocab_size), got '
        f'{images.min()}..{images.max()}.')
  return images.astype(np.int64)


def _tables(model, params, timesteps, resolution, first_resolution, support, density=()):
  gamma = tables.gamma_grid(model, params, timesteps, density)
  return gamma, (tables.coding_table(gamma, first_resolution, support),
                 tables.coding_table(gamma, resolution, support))


def _tables_digest(tabs) -> bytes:
  return fingerprints.digest(*(t.digest() for t in tabs))


@contextlib.contextmanager
def _progress(images: int, timesteps: int, what: str, enabled: bool):
  """An `advance(images)` callable, called at each of the T steps, drawing a bar with
  the images done and the ETA (after 5 s, if enabled)."""
  with tqdm.tqdm(total=images * timesteps, unit_scale=1 / timesteps, desc=what, delay=5,
                 mininterval=1,
                 disable=not enabled, bar_format='{desc}: {percentage:3.0f}%|{bar}| '
                 '{n:.1f}/{total:.0f} images [{elapsed}<{remaining}]') as bar:
    yield bar.update


# ------------------------------------------------------------------ the stacked code
def stacked_words(data: bytes) -> np.ndarray:
  """Conventional bytes as the stack's bottom words: zero-padded to whole words,
  XORed with a fixed keystream (their headers then read as random bits too), and a
  word 1 on top if the top word is 0 (an ANS stack never ends in a zero word)."""
  padded = data + b'\0' * (-len(data) % 4)
  words = np.frombuffer(padded, '<u4') ^ fingerprints.seed_words(len(padded) // 4,
                                                                 _WHITENING)
  return np.concatenate([words, [1]]).astype(np.uint32) if not words[-1] else words


def unstacked_bytes(words: np.ndarray, length: int) -> bytes:
  """The inverse of stacked_words; DecodeCheckError unless `words` is exactly such a
  stack for `length` bytes."""
  n = (length + 3) // 4
  if len(words) < n:
    raise file_format.DecodeCheckError('Decoding left too few words for the '
                                       'conventional code.')
  data = (np.asarray(words[:n], np.uint32) ^ fingerprints.seed_words(n, _WHITENING)
          ).astype('<u4').tobytes()[:length]
  if not np.array_equal(stacked_words(data), words):
    raise file_format.DecodeCheckError('Decoding did not restore the conventional code '
                                       'at the bottom of the stack.')
  return data


def prefix_images(images: np.ndarray, vocab_size: int, bits: float) -> int:
  """The fewest first images whose conventional code has `bits` bits (doubling, then
  bisection on the code's length); N when no shorter prefix has."""
  covers = lambda k: 8 * len(conventional.encode_set(images[:k], vocab_size)[1]) >= bits
  lo, hi = 0, 1  # lo does not cover (or is 0); hi is the next candidate
  while hi < len(images) - 1 and not covers(hi):
    lo, hi = hi, 2 * hi
  hi = min(hi, len(images) - 1)
  if hi < 1 or not covers(hi):
    return len(images)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if covers(mid) else (mid, hi)
  return hi


# ------------------------------------------------------------------ compress
def compress(model, params, images, *, timesteps: int = 400, batch_size: int = 64,
             first_group: int = 1, resolution: int = 8, first_resolution: int = 2,
             first_images: int = 8, support: int = 8, step: Optional[int] = None,
             conventional_images: Optional[int] = None, fallback: bool = True,
             step_placement: str = 'uniform', ideal_bits: bool = False,
             progress: bool = False) -> tuple[bytes, file_format.Report]:
  """Codes integer images [N, H, W, C] into one file (§9); returns (file, report).

  timesteps: T of the discrete-time model. batch_size: largest network batch.
  first_group: least images in the first bits-back group. resolution: grid bins per
  standard deviation; first_resolution: the same for the bits-back groups that start
  before their image `first_images`, coarser so that their first pops take fewer
  bits while the stack is short; support: pop supports in stds. step: the
  parameters' checkpoint step, recorded so that a decoder can name it.
  conventional_images: k, the images coded conventionally beneath the stack; None
  chooses the fewest that cover the first pops, 0 starts the stack from pseudo-random
  bits only. fallback: keep a conventional code of all images if it is shorter.
  step_placement: 'uniform' (γ(i/T)) or 'rate' (levels placed by a step density that
  the network estimates on the first images, stored in the file; §9.1).
  ideal_bits: report each bits-back image's information content under the coded
  models (costs extra arithmetic). progress: a progress bar on long files.
  """
  start = time.perf_counter()
  vocab = int(model.config.vocab_size)
  images = check_images(images, vocab)
  n, shape = len(images), images.shape[1:]
  dims = math.prod(shape)
  files = []
  if fallback or conventional_images == n:
    method, data = conventional.encode_set(images, vocab)
    header = file_format.Header(n, tuple(shape), vocab, fingerprints.images_hash(images),
                                method, n, len(data))
    packed = file_format.pack(header, data)
    files.append((packed, file_format.Report(
        n, dims, timesteps, f'conventional ({conventional.NAMES[method]})', n,
        8 * len(data), 0, 0, 8 * len(data), 8 * (len(packed) - len(data)), (), 0.0, 0.0,
        time.perf_counter() - start)))
  density = ()
  if step_placement == 'rate':
    ends = tables.gamma_grid(model, params, 1)
    density = steps.estimate_density(model, params, images[:DENSITY_IMAGES], vocab,
                                     ends[0], ends[1], batch_size=batch_size)
  elif step_placement != 'uniform':
    raise ValueError(f"step_placement={step_placement!r}: 'uniform' or 'rate'.")
  gamma, tabs = _tables(model, params, timesteps, resolution, first_resolution, support,
                        density)
  if conventional_images is None:
    conventional_images = prefix_images(
        images, vocab, first_group * coder.first_pops_bits(tabs[0], dims))
  if conventional_images < n:
    settings = dict(timesteps=timesteps, resolution=resolution,
                    first_resolution=first_resolution, first_images=first_images,
                    support=support, batch_size=batch_size, step_density=density)
    files.append(_bits_back_file(model, params, images, conventional_images, gamma, tabs,
                                 settings, first_group, step, ideal_bits, progress, start))
  return min(files, key=lambda f: len(f[0]))


def _seed_size(tab: tables.CodingTable, dims: int, first_group: int) -> int:
  """Pseudo-random seed words: the first group's first pops' supports, twice."""
  bits = dims * first_group * (math.log2(2 * tab.q_half[0] + 1) +
                               math.log2(2 * tab.q_half[1] + 1))
  return int(2 * bits / 32) + 64


def _bits_back_file(model, params, images, k, gamma, tabs, settings, first_group, step,
                    ideal_bits, progress, start):
  """The file with images[:k] conventional beneath images[k:] bits-back coded."""
  n, shape = len(images), images.shape[1:]
  dims, vocab = math.prod(shape), int(model.config.vocab_size)
  method, conv = conventional.encode_set(images[:k], vocab) if k else (0, b'')
  top = stacked_words(conv) if k else np.zeros(0, np.uint32)
  net = coder.Network(model, params, shape, vocab, gamma[0], compiler.compiler_options())
  seed_size = _seed_size(tabs[0], dims, first_group)
  flat = images[k:].reshape(n - k, dims)
  while True:
    seed = fingerprints.seed_words(seed_size)
    ans = coder.AnsStack(np.concatenate([seed, top]),
                       ideal_bits=n - k if ideal_bits else None)
    seed_bits = ans.bits()
    with _progress(n - k, settings['timesteps'], 'encode', progress) as advance:
      groups = coder.encode_images(ans, net, tabs, flat, vocab, settings['batch_size'],
                                   first_group, settings['first_images'],
                                   seed_bits - 32 * len(top), advance)
    if ans.min_words > 4:
      break
    seed_size *= 4  # The pops ran through the seed: their draws were not from q.
  final = ans.ans.get_compressed()
  untouched = min(ans.min_words - 2, seed_size)
  while untouched > 0 and not np.array_equal(final[:untouched], seed[:untouched]):
    untouched -= 1
  payload = np.asarray(final[untouched:], '<u4').tobytes()
  header = file_format.Header(
      n, tuple(shape), vocab, fingerprints.images_hash(images), method, k, len(conv),
      config_hash=fingerprints.config_hash(model.config),
      params_hash=fingerprints.params_hash(params), table_hash=_tables_digest(tabs),
      environment=fingerprints.environment_hash(), step=step, seed_words=seed_size,
      untouched_words=untouched, group_sizes=groups, **settings)
  data = file_format.pack(header, payload)
  what = 'bits-back' + (f' above {conventional.NAMES[method]}' if k else '')
  return data, file_format.Report(
      n, dims, settings['timesteps'], what, k, 8 * len(conv),
      ans.bits() - seed_bits, 32 * (seed_size - untouched), 8 * len(payload),
      8 * (len(data) - len(payload)), groups, net.seconds, ans.seconds,
      time.perf_counter() - start, ans.ideal)


# ------------------------------------------------------------------ decompress
def read_header(data: bytes) -> file_format.Header:
  return file_format.unpack(data)[0]


def decompress(model, params, data: bytes, *, timesteps: Optional[int] = None,
               resolution: Optional[int] = None, first_resolution: Optional[int] = None,
               first_images: Optional[int] = None, support: Optional[int] = None,
               step: Optional[int] = None, allow_other_environment: bool = False,
               timings: Optional[dict] = None, progress: bool = False) -> np.ndarray:
  """The images [N, H, W, C] of a file written by `compress`, bit-exact, in order.

  The coding settings come from the file; those given here must agree with it. `step`
  (the parameters' checkpoint step) only completes the message when they differ from
  the encoder's. `timings`, if a dict, receives seconds_network, seconds_coding and
  seconds_total. Raises file_format.CorruptFileError, MismatchError or DecodeCheckError.
  """
  start = time.perf_counter()
  header, payload = file_format.unpack(data)
  n, shape, k = header.num_images, header.image_shape, header.conventional_images
  images = np.zeros((n,) + tuple(shape), np.int64)
  timings = {} if timings is None else timings
  timings.update(seconds_network=0.0, seconds_coding=0.0)
  if header.bits_back_images:
    images[k:], payload = _decode_bits_back(
        model, params, header, payload, allow_other_environment, timings, progress, step,
        dict(timesteps=timesteps, resolution=resolution, first_resolution=first_resolution,
             first_images=first_images, support=support))
  elif len(payload) != header.conventional_bytes:
    raise file_format.CorruptFileError('The header and the payload disagree in length.')
  if k:
    try:
      images[:k] = conventional.decode_set(header.conventional, payload, k, shape,
                                           header.vocab_size)
    except conventional.ConventionalDecodeError as e:
      raise file_format.DecodeCheckError(f'The conventional code does not decode: {e}.')
  if fingerprints.images_hash(images)[:len(header.images_hash)] != header.images_hash:
    raise file_format.DecodeCheckError(
        'The decoded images do not match their fingerprint: the network outputs here '
        'differ from the encoder\'s (other device or software) or the file is damaged.')
  timings['seconds_total'] = time.perf_counter() - start
  return images.astype(np.uint8 if header.vocab_size <= 256 else np.int32)


def _decode_bits_back(model, params, header, payload, allow_other_environment, timings,
                      progress, step, settings):
  """(images[k:], the conventional bytes restored at the stack's bottom)."""
  gamma, tabs = _tables(model, params, header.timesteps, header.resolution,
                        header.first_resolution, header.support, header.step_density)
  file_format.check_model(header, fingerprints.config_hash(model.config),
                          fingerprints.params_hash(params), step, settings,
                          _tables_digest(tabs), allow_other_environment)
  if header.vocab_size != int(model.config.vocab_size):  # config.model agrees: altered
    raise file_format.CorruptFileError(
        f'The header is inconsistent: {header.vocab_size} values per sub-pixel, but its '
        f'model (config fingerprint) has vocab_size {model.config.vocab_size}.')
  dims = math.prod(header.image_shape)
  options = compiler.compiler_options() if header.version >= 2 else None
  net = coder.Network(model, params, header.image_shape, header.vocab_size, gamma[0],
                      options)
  seed = fingerprints.seed_words(header.seed_words)
  words = np.concatenate([seed[:header.untouched_words], np.frombuffer(payload, '<u4')])
  try:
    ans = coder.AnsStack(words.astype(np.uint32))
  except ValueError as e:
    raise file_format.CorruptFileError(f'The payload is not an ANS stack: {e}.') from e
  with _progress(header.bits_back_images, header.timesteps, 'decode',
                 progress) as advance:
    try:
      flat = coder.decode_images(ans, net, tabs, header.group_sizes, dims,
                                 header.vocab_size, header.batch_size, header.first_images,
                                 advance)
    except flax.errors.ScopeParamShapeError as e:
      raise file_format.CorruptFileError(
          f'The header is inconsistent: images of {header.image_shape[-1]} channel(s), '
          'which the parameters of its model (fingerprint) do not take.') from e
    except (file_format.CodecError, ValueError) as e:
      raise file_format.DecodeCheckError(
          f'Decoding diverged from the encoder ({e}): the network outputs here differ '
          'from the encoder\'s (other device or software) or the file is damaged.') from e
  final = ans.ans.get_compressed()
  if not np.array_equal(final[:len(seed)], seed):
    raise file_format.DecodeCheckError(
        'Decoding did not restore the encoder\'s initial stack: the network outputs '
        'here differ from the encoder\'s (other device or software).')
  top = final[len(seed):]
  conv = unstacked_bytes(top, header.conventional_bytes) if header.conventional_images \
      else b''
  if not header.conventional_images and len(top):
    raise file_format.DecodeCheckError('Decoding left words above the initial stack.')
  timings.update(seconds_network=net.seconds, seconds_coding=ans.seconds)
  return flat.reshape((-1,) + tuple(header.image_shape)), conv
