"""The file format of the bits-back codec (vdm_jax/codec/coder.py): header, checks, errors.

A file is

    magic b'VDMC' | version u8 | header (fixed fields, group sizes, environment)
    | SHA-256[:16] of everything before | payload: uint32 little-endian words

The header names everything a decoder must share with the encoder: the model (a hash
of `config.model` and one of the parameters' bytes), the coding settings (T, the grid
resolution and support, a hash of the coding table computed from them), the images'
count and shape, the network batch and the group sizes, the software and device that
computed the network outputs, and checksums of the payload and of the images. Every
check raises a `CodecError` subclass that names what differs.
"""

import dataclasses
import hashlib
import json
import struct
from typing import Any

from importlib import metadata

import jax
import jaxlib
import numpy as np

from vdm_jax import errors

MAGIC = b'VDMC'
VERSION = 1
DIGEST_BYTES = 16  # Truncated SHA-256: 128 bits, for identity checks only.

# magic, version, config/params/table hashes, T, resolution, coarse resolution, coarse
# images, support, N, H, W, C, V,
# network batch, seed words, untouched seed words, payload words, payload hash,
# images hash, number of groups.
_FIXED = struct.Struct('<4sB16s16s16s' 'IHHIH' 'IHHHI' 'HIII' '16s16sI')


class CodecError(errors.InputError):
  """Base class: a file that cannot be written or read as asked."""


class CorruptFileError(CodecError):
  """Not a codec file, or truncated, or altered."""


class MismatchError(CodecError):
  """The file was written with another model, other coding settings or environment."""


class DecodeCheckError(CodecError):
  """Decoding finished but its result fails the file's checksums."""


@dataclasses.dataclass(frozen=True)
class Header:
  """Everything a decoder needs besides the model and the payload."""
  config_hash: bytes  # digest of the model-defining config (config.model)
  params_hash: bytes  # digest of the parameters' names, shapes, dtypes and bytes
  table_hash: bytes  # digest of the coding table (tables.CodingTable.digest)
  timesteps: int  # T of the discrete-time model
  resolution: int  # grid bins per standard deviation
  first_resolution: int  # the same for the first groups, whose pops take the initial bits
  first_images: int  # groups starting before this image use first_resolution
  support: int  # half-width of the pop supports, in standard deviations
  num_images: int  # N
  image_shape: tuple  # (H, W, C)
  vocab_size: int  # V
  batch_size: int  # largest network batch; a group of g uses the bucket of g
  seed_words: int  # S: the coder starts from S pseudo-random words
  untouched_words: int  # m: the seed's bottom m words, never popped, not stored
  payload_words: int  # stored words (the final stream minus those m)
  payload_hash: bytes
  images_hash: bytes
  group_sizes: tuple  # images per group, in encoding order
  environment: str  # software and device that computed the network outputs

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
  net_bits: int  # final stream − seed: what the images add to the stack
  initial_bits: int  # seed bits the first pops consumed (stored in the payload)
  payload_bits: int  # stored stream: ≈ net + initial
  header_bits: int
  group_sizes: tuple
  seconds_network: float
  seconds_coding: float  # entropy coding (constriction) and its array arithmetic
  seconds_total: float
  ideal_bits: Any = None  # [N] per-image information content, if asked

  def bpd(self, bits) -> float:
    return float(bits) / (self.num_images * self.dims_per_image)

  @property
  def net_bpd(self) -> float:
    return self.bpd(self.net_bits)

  @property
  def initial_bpd(self) -> float:
    return self.bpd(self.initial_bits)

  @property
  def file_bpd(self) -> float:
    return self.bpd(self.payload_bits + self.header_bits)

  def summary(self) -> str:
    return (f'{self.num_images} images, T={self.timesteps}: net {self.net_bpd:.4f} bpd, '
            f'initial bits {self.initial_bits} ({self.initial_bpd:.4f} bpd amortised), '
            f'file {self.file_bpd:.4f} bpd ({(self.payload_bits + self.header_bits) // 8} '
            f'bytes, header {self.header_bits // 8}); {len(self.group_sizes)} groups; '
            f'{self.seconds_total:.1f} s ({self.seconds_network:.1f} s network, '
            f'{self.seconds_coding:.1f} s entropy coding)')


def digest(*parts: bytes) -> bytes:
  h = hashlib.sha256()
  for p in parts:
    h.update(len(p).to_bytes(8, 'little'))
    h.update(p)
  return h.digest()[:DIGEST_BYTES]


def config_hash(model_config) -> bytes:
  """Digest of `config.model` (every field, sorted): what defines the network."""
  cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  return digest(json.dumps(cfg, sort_keys=True, default=repr).encode())


def params_hash(params: Any) -> bytes:
  """Digest of the parameters: each leaf's path, dtype, shape and bytes."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  parts = []
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    parts += [jax.tree_util.keystr(path).encode(), f'{a.dtype}{a.shape}'.encode(),
              a.tobytes()]
  return digest(*parts)


def images_hash(images: np.ndarray) -> bytes:
  a = np.ascontiguousarray(images, dtype=np.int64)
  return digest(str(a.shape).encode(), a.tobytes())


def environment() -> str:
  """What the network outputs depend on besides the model: XLA version and device."""
  device = jax.devices()[0]
  return (f'jax {jax.__version__}; jaxlib {jaxlib.__version__}; {device.platform} '
          f'{device.device_kind}; constriction {metadata.version("constriction")}')


def seed_words(count: int) -> np.ndarray:
  """The coder's fixed pseudo-random initial words (SHA-256 in counter mode)."""
  blocks = [hashlib.sha256(b'vdm_jax bits-back seed' + i.to_bytes(8, 'little')).digest()
            for i in range((count + 7) // 8)]
  return np.frombuffer(b''.join(blocks), '<u4')[:count].astype(np.uint32)


def pack(header: Header, payload: np.ndarray) -> bytes:
  """Header and payload words as one file."""
  h, w, c = header.image_shape
  env = header.environment.encode()
  head = _FIXED.pack(
      MAGIC, VERSION, header.config_hash, header.params_hash, header.table_hash,
      header.timesteps, header.resolution, header.first_resolution, header.first_images,
      header.support, header.num_images, h, w, c,
      header.vocab_size, header.batch_size, header.seed_words, header.untouched_words,
      header.payload_words, header.payload_hash, header.images_hash,
      len(header.group_sizes))
  head += np.asarray(header.group_sizes, '<u2').tobytes()
  head += struct.pack('<H', len(env)) + env
  return head + digest(head) + np.asarray(payload, '<u4').tobytes()


def unpack(data: bytes) -> tuple[Header, np.ndarray]:
  """(header, payload words) of a file, after checking its integrity."""
  if len(data) < 5 or data[:4] != MAGIC:
    raise CorruptFileError('Not a vdm_jax codec file (its first bytes are not '
                           f'{MAGIC!r}).')
  if data[4] != VERSION:
    raise CorruptFileError(f'Format version {data[4]}; this vdm_jax reads version '
                           f'{VERSION}.')
  if len(data) < _FIXED.size:
    raise CorruptFileError(f'Truncated: {len(data)} bytes, shorter than the header.')
  f = _FIXED.unpack_from(data)
  num_groups = f[-1]
  pos = _FIXED.size + 2 * num_groups
  if len(data) < pos + 2:
    raise CorruptFileError(f'Truncated: {len(data)} bytes, shorter than the header.')
  groups = tuple(int(g) for g in np.frombuffer(data, '<u2', num_groups, _FIXED.size))
  (env_len,) = struct.unpack_from('<H', data, pos)
  end = pos + 2 + env_len
  if len(data) < end + DIGEST_BYTES:
    raise CorruptFileError(f'Truncated: {len(data)} bytes, shorter than the header.')
  if digest(data[:end]) != data[end:end + DIGEST_BYTES]:
    raise CorruptFileError('The header was altered (its checksum does not match).')
  header = Header(
      config_hash=f[2], params_hash=f[3], table_hash=f[4], timesteps=f[5],
      resolution=f[6], first_resolution=f[7], first_images=f[8], support=f[9],
      num_images=f[10], image_shape=tuple(f[11:14]), vocab_size=f[14], batch_size=f[15],
      seed_words=f[16], untouched_words=f[17], payload_words=f[18], payload_hash=f[19],
      images_hash=f[20], group_sizes=groups,
      environment=data[pos + 2:end].decode())
  body = data[end + DIGEST_BYTES:]
  if len(body) != 4 * header.payload_words:
    raise CorruptFileError(
        f'Truncated or extended: the payload has {len(body)} bytes, the header says '
        f'{4 * header.payload_words}.')
  if digest(body) != header.payload_hash:
    raise CorruptFileError('The payload was altered (its checksum does not match).')
  return header, np.frombuffer(body, '<u4').astype(np.uint32)


def check_model(header: Header, cfg_hash: bytes, prm_hash: bytes, settings: dict,
                table_hash: bytes, allow_other_environment: bool) -> None:
  """Raises MismatchError naming the first thing that differs from the file."""
  if header.config_hash != cfg_hash:
    raise MismatchError('The file was written with another model: its config.model '
                        'differs from the one given (config hash mismatch).')
  if header.params_hash != prm_hash:
    raise MismatchError('The file was written with other model parameters (another '
                        'checkpoint, or raw instead of EMA parameters).')
  for name, value in settings.items():
    if value is not None and value != getattr(header, name):
      raise MismatchError(f'The file was written with {name}={getattr(header, name)}, '
                          f'decoding was asked for {name}={value}.')
  if header.table_hash != table_hash:
    raise MismatchError(
        'The coding table computed here differs from the encoder\'s although model '
        'and settings agree: the schedule was evaluated with other floating-point '
        f'maths (file: {header.environment}; here: {environment()}).')
  if header.environment != environment() and not allow_other_environment:
    raise MismatchError(
        f'The file was written on "{header.environment}", this is "{environment()}". '
        'Decoding needs bit-identical network outputs, which other software or '
        'devices need not give; pass allow_other_environment=True to try anyway '
        '(a wrong result is then caught by the image checksum).')
