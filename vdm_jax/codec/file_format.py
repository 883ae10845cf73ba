"""The file format of the codec (vdm_jax/codec/compressor.py): header, checks, errors.

Version 3 (written):

    b'VDMC' | 3 | conventional method u8 | varints N, H, W, C, V, k, conventional bytes
    | if N > k, the bits-back part: fingerprints of config.model, the parameters, the
      coding table and the environment (4 bytes each); varints checkpoint step + 1,
      T, resolution, first resolution, first images, support, network batch,
      seed words, untouched seed words, number of groups, group sizes, K and the
      K bytes of the step density (K = 0: equal steps in t)
    | images fingerprint (4 bytes) | checksum (4 bytes) | payload

The first k images are in the conventional code (conventional.py); the other N − k are
bits-back coded, and the conventional bytes lie at the bottom of their stack (§9). The
payload is the stack's words (uint32 little-endian) when N > k, else the conventional
bytes. The checksum covers every byte of the file but its own. Fingerprints are
truncated SHA-256: enough to refuse another model, table or environment, which would
otherwise be caught only after decoding by the images' fingerprint. Version 2 (read
only) is the same layout without JPEG XL among the conventional methods and without
the step density (its steps are equal in t). Version 1 (read only) had 16-byte
digests, the environment as text and no conventional part.
"""

import dataclasses
import hashlib
import struct
from typing import Any, Optional

import numpy as np

from vdm_jax import errors
from vdm_jax.codec import conventional
from vdm_jax.codec import fingerprints

MAGIC = b'VDMC'
VERSION = 3
VERSIONS = (1, 2, 3)
FINGERPRINT_BYTES = 4
CHECKSUM_BYTES = 4


class CodecError(errors.InputError):
  """Base class: a file that cannot be written or read as asked."""


class CorruptFileError(CodecError):
  """Not a codec file, or truncated, or altered."""


class MismatchError(CodecError):
  """The file was written with another model, other coding settings or environment."""


class DecodeCheckError(CodecError):
  """Decoding finished but its result fails the file's checks."""


@dataclasses.dataclass(frozen=True)
class Header:
  """Everything a decoder needs besides the model and the payload."""
  num_images: int  # N
  image_shape: tuple  # (H, W, C)
  vocab_size: int  # V
  images_hash: bytes  # fingerprint of the images
  conventional: int = 0  # conventional.JPEGXL / WEBP / PNG / RAW for the first k; 0: none
  conventional_images: int = 0  # k
  conventional_bytes: int = 0  # length of their code
  version: int = VERSION
  # The bits-back part (N > k):
  config_hash: bytes = b''  # fingerprint of the model-defining config (config.model)
  params_hash: bytes = b''  # fingerprint of the parameters' names, shapes and bytes
  table_hash: bytes = b''  # fingerprint of the coding tables (tables.CodingTable.digest)
  environment: bytes = b''  # fingerprint of the software and device (fingerprints.py)
  step: Optional[int] = None  # checkpoint step of the parameters, if known
  timesteps: int = 0  # T of the discrete-time model
  resolution: int = 0  # grid bins per standard deviation
  first_resolution: int = 0  # the same for the first groups, whose pops dig deepest
  first_images: int = 0  # groups starting before this image use first_resolution
  support: int = 0  # half-width of the pop supports, in standard deviations
  batch_size: int = 0  # largest network batch; a group of g uses the bucket of g
  seed_words: int = 0  # S: pseudo-random words below the conventional bytes
  untouched_words: int = 0  # m: the seed's bottom m words, never popped, not stored
  group_sizes: tuple = ()  # bits-back images per group, in encoding order
  step_density: tuple = ()  # K bytes placing the T steps (steps.py); (): equal steps in t

  @property
  def bits_back_images(self) -> int:
    return self.num_images - self.conventional_images

  @property
  def settings(self) -> dict:
    return dict(timesteps=self.timesteps, resolution=self.resolution,
                first_resolution=self.first_resolution, first_images=self.first_images,
                support=self.support)


@dataclasses.dataclass
class Report:
  """Sizes and times of one compression; bits per dimension are over N·D."""
  num_images: int
  dims_per_image: int
  timesteps: int
  method: str  # what the file holds: conventional, bits-back, or both
  conventional_images: int  # k, coded conventionally
  conventional_bits: int  # their code, at the bottom of the stack or the whole payload
  net_bits: int  # what the N − k bits-back images add to the stack
  initial_bits: int  # pseudo-random seed bits the first pops consumed (stored)
  payload_bits: int
  header_bits: int
  group_sizes: tuple
  seconds_network: float
  seconds_coding: float  # entropy coding (constriction) and its array arithmetic
  seconds_total: float
  ideal_bits: Any = None  # [N] per-image information content, if asked (bits-back only)

  def bpd(self, bits) -> float:
    return float(bits) / (self.num_images * self.dims_per_image)

  @property
  def net_bpd(self) -> float:
    """Net bits per dimension of the bits-back images alone."""
    images = self.num_images - self.conventional_images
    return float(self.net_bits) / max(1, images * self.dims_per_image)

  @property
  def initial_bpd(self) -> float:
    return self.bpd(self.initial_bits)

  @property
  def file_bits(self) -> int:
    return self.payload_bits + self.header_bits

  @property
  def file_bpd(self) -> float:
    return self.bpd(self.file_bits)

  def summary(self) -> str:
    return (f'{self.num_images} images, {self.method}: file {self.file_bpd:.4f} bpd '
            f'({self.file_bits // 8} bytes, header {self.header_bits // 8}); '
            f'{self.conventional_images} images conventional ({self.conventional_bits // 8}'
            f' bytes), {self.num_images - self.conventional_images} bits-back at T='
            f'{self.timesteps} (net {self.net_bpd:.4f} bpd, initial bits '
            f'{self.initial_bits}, {len(self.group_sizes)} groups); '
            f'{self.seconds_total:.1f} s ({self.seconds_network:.1f} s network, '
            f'{self.seconds_coding:.1f} s entropy coding)')


# ------------------------------------------------------------------ varints
def _varints(*values: int) -> bytes:
  """Unsigned LEB128: 7 bits a byte, low bits first."""
  out = bytearray()
  for v in values:
    while v >= 0x80:
      out.append(v & 0x7f | 0x80)
      v >>= 7
    out.append(v)
  return bytes(out)


class _Reader:
  def __init__(self, data: bytes, pos: int):
    self.data, self.pos = data, pos

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise CorruptFileError(f'Truncated: {len(self.data)} bytes, shorter than the header.')
    self.pos += n
    return self.data[self.pos - n:self.pos]

  def varint(self) -> int:
    value = shift = 0
    while True:
      byte = self.take(1)[0]
      value |= (byte & 0x7f) << shift
      shift += 7
      if byte < 0x80:
        return value
      if shift > 63:
        raise CorruptFileError('The header holds a number too long for this format.')

  def varints(self, n: int) -> list:
    return [self.varint() for _ in range(n)]


# ------------------------------------------------------------------ versions 2 and 3
def pack(header: Header, payload: bytes) -> bytes:
  """Header and payload as one file (version 3)."""
  fp = lambda b: b[:FINGERPRINT_BYTES]  # pylint: disable=unnecessary-lambda-assignment
  head = MAGIC + bytes([VERSION, header.conventional]) + _varints(
      header.num_images, *header.image_shape, header.vocab_size,
      header.conventional_images, header.conventional_bytes)
  if header.bits_back_images:
    head += (fp(header.config_hash) + fp(header.params_hash) + fp(header.table_hash)
             + fp(header.environment))
    head += _varints(0 if header.step is None else header.step + 1, header.timesteps,
                     header.resolution, header.first_resolution, header.first_images,
                     header.support, header.batch_size, header.seed_words,
                     header.untouched_words, len(header.group_sizes), *header.group_sizes)
    head += _varints(len(header.step_density)) + bytes(header.step_density)
  head += fp(header.images_hash)
  return head + _checksum(head, payload) + payload


def _checksum(head: bytes, payload: bytes) -> bytes:
  return hashlib.sha256(head + payload).digest()[:CHECKSUM_BYTES]


def unpack(data: bytes) -> tuple[Header, bytes]:
  """(header, payload bytes) of a file of any version read, after its integrity checks."""
  if len(data) < 6 or data[:4] != MAGIC:
    raise CorruptFileError(f'Not a vdm_jax codec file (its first bytes are not {MAGIC!r}).')
  if data[4] not in VERSIONS:
    raise CorruptFileError(f'Format version {data[4]}; this vdm_jax reads versions '
                           f'{", ".join(map(str, VERSIONS))}.')
  if data[4] == 1:
    return _unpack_v1(data)
  r = _Reader(data, 6)
  n, h, w, c, v, k, conv_bytes = r.varints(7)
  fields = dict(version=data[4], num_images=n, image_shape=(h, w, c), vocab_size=v,
                conventional=data[5], conventional_images=k, conventional_bytes=conv_bytes)
  if n > k:
    fields.update(config_hash=r.take(4), params_hash=r.take(4), table_hash=r.take(4),
                  environment=r.take(4))
    step, *settings, groups = r.varints(10)
    fields.update(step=step - 1 if step else None, **dict(zip(
        ('timesteps', 'resolution', 'first_resolution', 'first_images', 'support',
         'batch_size', 'seed_words', 'untouched_words'), settings)))
    fields['group_sizes'] = tuple(r.varints(min(groups, len(data))))
    if data[4] >= 3:
      fields['step_density'] = tuple(r.take(r.varint()))
  header = Header(images_hash=r.take(FINGERPRINT_BYTES), **fields)
  head = data[:r.pos]
  checksum = r.take(CHECKSUM_BYTES)
  payload = data[r.pos:]
  if _checksum(head, payload) != checksum:
    raise CorruptFileError('The file was truncated or altered (its checksum does not '
                           'match).')
  if n < 1 or k > n or (n > k and (not header.group_sizes
                                   or sum(header.group_sizes) != n - k
                                   or len(payload) % 4)):
    raise CorruptFileError('The header is inconsistent (image or group counts).')
  if 0 in header.step_density:
    raise CorruptFileError('The header is inconsistent (a step density of 0).')
  _check_header(header, len(payload))
  return header, payload


MAX_VALUES = 2**31 - 1  # N·H·W·C: more than any file of this codec holds


def _check_header(h: Header, payload_bytes: int) -> None:
  """Raises CorruptFileError naming the first field (its checksum valid) that the file
  cannot hold, before the field sizes an array or picks a branch of the decoder."""
  n, (height, width, c), v, k = h.num_images, h.image_shape, h.vocab_size, h.conventional_images
  raw_bytes = k * height * width * c * (2 if v > 256 else 1)
  bits_back = (h.timesteps, h.resolution, h.first_resolution, h.support, h.batch_size,
               *h.group_sizes) if n > k else (1,)
  most_seed = 64 * (n - k) * height * width * c + 1024  # far above what the encoder uses
  problem = next((text for bad, text in (
      (min(height, width, c) < 1 or n * height * width * c > MAX_VALUES,
       f'{n} images of {height}x{width}x{c} (each side ≥ 1, N·H·W·C ≤ {MAX_VALUES})'),
      (v < 2, f'{v} values per sub-pixel (at least 2)'),
      (not k and (h.conventional or h.conventional_bytes),
       'a conventional method or length without conventional images'),
      (k and h.conventional not in conventional.NAMES,
       f'conventional method {h.conventional}'),
      (k and h.conventional != conventional.RAW and (c not in conventional.MODES or v > 256),
       f'{c} channel(s) of {v} values in a WebP or PNG picture'),
      (k and h.conventional == conventional.RAW and h.conventional_bytes != raw_bytes,
       f'{h.conventional_bytes} raw bytes for {k} images ({raw_bytes} expected)'),
      (k and not 1 <= h.conventional_bytes <= payload_bytes,
       f'{h.conventional_bytes} conventional bytes in a payload of {payload_bytes}'),
      (n == k and h.conventional_bytes != payload_bytes,
       f'{h.conventional_bytes} conventional bytes, but a payload of {payload_bytes}'),
      (min(bits_back) < 1, 'T, a resolution, the support, the network batch or a group '
       'size below 1'),
      (n > k and not h.untouched_words <= h.seed_words <= most_seed,
       f'{h.seed_words} seed words ({h.untouched_words} untouched) for {n - k} images'),
  ) if bad), None)
  if problem:
    raise CorruptFileError(f'The header is inconsistent: {problem}.')


# ------------------------------------------------------------------ version 1
# magic, version, config/params/table hashes, T, resolution, coarse resolution, coarse
# images, support, N, H, W, C, V, network batch, seed words, untouched seed words,
# payload words, payload hash, images hash, number of groups.
_V1_FIXED = struct.Struct('<4sB16s16s16s' 'IHHIH' 'IHHHI' 'HIII' '16s16sI')


def _unpack_v1(data: bytes) -> tuple[Header, bytes]:
  """Version 1: fixed fields, group sizes, environment text, header digest, payload."""
  if len(data) < _V1_FIXED.size:
    raise CorruptFileError(f'Truncated: {len(data)} bytes, shorter than the header.')
  f = _V1_FIXED.unpack_from(data)
  r = _Reader(data, _V1_FIXED.size)
  groups = tuple(int(g) for g in np.frombuffer(r.take(2 * f[-1]), '<u2'))
  (env_len,) = struct.unpack('<H', r.take(2))
  env = r.take(env_len)
  end = r.pos
  if fingerprints.digest(data[:end]) != r.take(16):
    raise CorruptFileError('The header was altered (its checksum does not match).')
  payload = data[r.pos:]
  if len(payload) != 4 * f[18]:
    raise CorruptFileError(f'Truncated or extended: the payload has {len(payload)} bytes, '
                           f'the header says {4 * f[18]}.')
  if fingerprints.digest(payload) != f[19]:
    raise CorruptFileError('The payload was altered (its checksum does not match).')
  if not groups or sum(groups) != f[10]:
    raise CorruptFileError('The group sizes do not add up to N.')
  header = Header(
      version=1, config_hash=f[2], params_hash=f[3], table_hash=f[4], timesteps=f[5],
      resolution=f[6], first_resolution=f[7], first_images=f[8], support=f[9],
      num_images=f[10], image_shape=tuple(f[11:14]), vocab_size=f[14], batch_size=f[15],
      seed_words=f[16], untouched_words=f[17], images_hash=f[20], group_sizes=groups,
      environment=fingerprints.digest(env))
  _check_header(header, len(payload))
  return header, payload


# ------------------------------------------------------------------ checks
def _same(stored: bytes, full: bytes) -> bool:
  return stored == full[:len(stored)]


def check_model(header: Header, cfg_hash: bytes, prm_hash: bytes, step: Optional[int],
                settings: dict, table_hash: bytes, allow_other_environment: bool) -> None:
  """Raises MismatchError naming the first thing that differs from the file."""
  if not _same(header.config_hash, cfg_hash):
    raise MismatchError('The file was written with another model: its config.model '
                        'differs from the one given (config fingerprint mismatch).')
  if not _same(header.params_hash, prm_hash):
    written = ('an unrecorded checkpoint step' if header.step is None
               else f'the checkpoint of step {header.step}')
    given = '' if step is None else f'; the parameters given are of step {step}'
    raise MismatchError(
        f'The file was written with other model parameters: those of {written} (with '
        f'config.eval.use_ema as then){given}. Decode with that checkpoint.')
  for name, value in settings.items():
    if value is not None and value != getattr(header, name):
      raise MismatchError(f'The file was written with {name}={getattr(header, name)}, '
                          f'decoding was asked for {name}={value}.')
  here = fingerprints.environment()
  if not _same(header.table_hash, table_hash):
    raise MismatchError(
        'The coding table computed here differs from the encoder\'s although model '
        'and settings agree: the schedule was evaluated with other floating-point '
        f'maths (here: {here}).')
  if (not _same(header.environment, fingerprints.digest(here.encode()))
      and not allow_other_environment):
    raise MismatchError(
        f'The file was written with other software or on another device than this '
        f'one ({here}). Decoding needs bit-identical network outputs, which other '
        'versions or devices need not give; pass allow_other_environment=True to try '
        'anyway (a wrong result is then refused by the images\' fingerprint).')
