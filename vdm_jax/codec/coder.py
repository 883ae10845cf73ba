"""Lossless compression with a VDM: bits-back coding with the discrete-time model.

docs/maths.md §9. The latent-variable model p(z_1) Π_i p(z_{i-1} | z_i) p(x | z_0) of T
steps (z_i at t = i/T), with the forward chain as the approximate posterior, coded on an
ANS stack (constriction) in the order that needs initial bits only for the first pops:

    encode:  pop z_0 ~ q(z_0|x); push x ~ p(x|z_0);
             for i = 1..T: pop z_i ~ q(z_i|z_{i-1}); push z_{i-1} ~ p(z_{i-1}|z_i);
             push z_T ~ N(0, I).
    decode:  the same steps in reverse, pushes and pops exchanged.

    data, report = coder.compress(model, params, images, timesteps=400)
    images = coder.decompress(model, params, data)

Latents live on grids z_i = k_i·δ_i, δ_i a fixed fraction of the standard deviations
coded at level i, and are coded as integer offsets from a reference point that the
decoder can compute. The network sees the grid values, so encoder and decoder compute
the same ε̂ bit for bit. Images are coded in groups, one batched network call per step
per group; the first group is small because its first pops take the initial bits
(9 to 14 bits per dimension and image) from a fixed pseudo-random seed, and each later
group is as large as the bits already on the stack allow (bounded by the batch).
"""

import math
import time
from typing import Optional

import constriction
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from vdm_jax.codec import file_format
from vdm_jax.codec import tables
from vdm_jax.model import vdm

_QG = constriction.stream.model.QuantizedGaussian
_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


# ------------------------------------------------------------------ network calls
def bucket(group: int, batch_size: int) -> int:
  """Network batch for a group of `group` images: the next power of two, at most B."""
  return min(batch_size, 1 << max(0, group - 1).bit_length())


class Network:
  """The two jitted calls, fixed shapes per bucket: ε̂(z_i, γ_i) and p(x | z_0)."""

  def __init__(self, model, params, image_shape, vocab_size: int, gamma_0: float):
    self.params = params
    self.image_shape = tuple(image_shape)
    self.seconds = 0.0

    def eps_hat(params, z, gamma_t):
      g = jnp.full((z.shape[0],), gamma_t, jnp.float32)
      cond = jnp.zeros((z.shape[0],), jnp.float32)
      return model.apply({'params': params}, z, g, cond, method=vdm.VDM.score)

    def x_probs(z0):
      g0 = jnp.float32(gamma_0)
      u = z0 / jnp.sqrt(nn.sigmoid(-g0))  # u = z_0/α_0 (§3)
      return jax.nn.softmax(vdm.decoder_logits(u, g0, vocab_size), axis=-1)

    self._eps_hat = jax.jit(eps_hat)
    self._x_probs = jax.jit(x_probs)

  def _padded(self, z: np.ndarray, batch: int) -> np.ndarray:
    out = np.zeros((batch,) + self.image_shape, np.float32)
    out[:len(z)] = z.reshape((len(z),) + self.image_shape)
    return out

  def eps_hat(self, z: np.ndarray, gamma_t: float, batch: int) -> np.ndarray:
    start = time.perf_counter()
    e = self._eps_hat(self.params, self._padded(z, batch), np.float32(gamma_t))
    e = np.asarray(jax.device_get(e), np.float64)[:len(z)].reshape(len(z), -1)
    self.seconds += time.perf_counter() - start
    return e

  def x_probs(self, z0: np.ndarray, batch: int) -> np.ndarray:
    start = time.perf_counter()
    p = np.asarray(jax.device_get(self._x_probs(self._padded(z0, batch))))[:len(z0)]
    self.seconds += time.perf_counter() - start
    return p.reshape(-1, p.shape[-1])


def _grid_values(k: np.ndarray, delta: float) -> np.ndarray:
  """z = k·δ: one IEEE float64 product rounded to float32, the same on every machine."""
  return (k.astype(np.float64) * delta).astype(np.float32)


def _embed(x: np.ndarray, vocab_size: int) -> np.ndarray:
  """f = 2(x + ½)/V − 1 (§1), float64."""
  return 2.0 * (x.astype(np.float64) + 0.5) / vocab_size - 1.0


# ------------------------------------------------------------------ one group
class _Coder:
  """An ANS stack with the scheme's pops and pushes; times the entropy coding and
  tracks the lowest stack level. With `ideal_bits=N` it also adds up each image's
  information content −log2 P under the models coded (pushes minus pops)."""

  def __init__(self, words: np.ndarray, ideal_bits: Optional[int] = None):
    self.ans = constriction.stream.stack.AnsCoder(words)
    self.seconds = 0.0
    self.min_words = self.ans.num_words()
    self.group_min_bits = self.bits()
    self.image_offset = 0
    self.ideal = None if ideal_bits is None else np.zeros(ideal_bits)
    self._families = {}

  def bits(self) -> int:
    return self.ans.num_valid_bits()

  def _family(self, half: int):
    if half not in self._families:
      self._families[half] = _QG(-int(half), int(half))
    return self._families[half]

  def _account(self, sign: float, bits: np.ndarray) -> None:
    i = self.image_offset
    self.ideal[i:i + len(bits)] += sign * bits.reshape(len(bits), -1).sum(axis=1)

  def pop(self, half, ref, mean, std):
    """k = ref + offset, offset ~ QuantizedGaussian(mean − ref, std) on ±half bins."""
    start = time.perf_counter()
    rel = (mean - ref).ravel()
    off = self.ans.decode(self._family(half), rel, np.full(rel.shape, std))
    self.min_words = min(self.min_words, self.ans.num_words())
    self.group_min_bits = min(self.group_min_bits, self.bits())
    self.seconds += time.perf_counter() - start
    if self.ideal is not None:
      self._account(-1.0, _gauss_bits(off, rel, std, half).reshape(mean.shape))
    return ref.astype(np.int64) + off.reshape(mean.shape)

  def push(self, k, half, ref, mean, std):
    start = time.perf_counter()
    off = (k - ref).ravel()
    if np.abs(off).max() > half:
      raise file_format.CodecError(
          f'A latent fell {int(np.abs(off).max())} bins from its reference, outside '
          f'the coder\'s support of ±{int(half)}; increase coder.support.')
    rel = (mean - ref).ravel()
    self.ans.encode_reverse(off.astype(np.int32), self._family(half), rel,
                            np.full(rel.shape, std))
    self.seconds += time.perf_counter() - start
    if self.ideal is not None:
      self._account(1.0, _gauss_bits(off, rel, std, half).reshape(k.shape))

  def pop_x(self, probs):
    start = time.perf_counter()
    x = self.ans.decode(_CATEGORICAL, probs)
    self.seconds += time.perf_counter() - start
    return x

  def push_x(self, x, probs, num_images: int):
    start = time.perf_counter()
    self.ans.encode_reverse(x.astype(np.int32), _CATEGORICAL, probs)
    self.seconds += time.perf_counter() - start
    if self.ideal is not None:
      p = np.maximum(probs[np.arange(len(x)), x] / probs.sum(axis=1), 2.0**-24)
      self._account(1.0, -np.log2(p).reshape(num_images, -1))


def _gauss_bits(off, mean, std, half) -> np.ndarray:
  """−log2 of the mass of bin `off` under N(mean, std²) truncated to ±(half + ½)."""
  lo, hi = (off - 0.5 - mean) / std, (off + 0.5 - mean) / std
  mass = np.where(lo > 0, special.ndtr(-lo) - special.ndtr(-hi),
                  special.ndtr(hi) - special.ndtr(lo))
  total = special.ndtr((half + 0.5 - mean) / std) - special.ndtr((-half - 0.5 - mean) / std)
  return -np.log2(np.maximum(mass / total, 2.0**-24))


def encode_group(coder: _Coder, net: Network, tab: tables.CodingTable, x: np.ndarray,
                 vocab_size: int, batch: int) -> None:
  """Pushes the images x [g, D] onto the stack (the encoding order of §9)."""
  T = tab.timesteps
  mean = tab.q_coef[0] * _embed(x, vocab_size)
  k = coder.pop(tab.q_half[0], np.rint(mean), mean, tab.q_std[0])
  coder.push_x(x.ravel(), net.x_probs(_grid_values(k, tab.delta[0]), batch),
               len(x))
  for i in range(1, T + 1):
    mean = tab.q_coef[i] * k
    k_next = coder.pop(tab.q_half[i], np.rint(mean), mean, tab.q_std[i])
    eps = net.eps_hat(_grid_values(k_next, tab.delta[i]), tab.gamma[i], batch)
    centre = tab.p_centre[i - 1] * k_next
    coder.push(k, tab.p_half[i - 1], np.rint(centre), centre - tab.p_eps[i - 1] * eps,
               tab.p_std[i - 1])
    k = k_next
  zero = np.zeros(k.shape)
  coder.push(k, tab.p_half[T], zero, zero, tab.p_std[T])


def decode_group(coder: _Coder, net: Network, tab: tables.CodingTable, shape,
                 vocab_size: int, batch: int) -> np.ndarray:
  """Pops g images [g, D] off the stack: encode_group run backwards."""
  T = tab.timesteps
  zero = np.zeros(shape)
  k = coder.pop(tab.p_half[T], zero, zero, tab.p_std[T])
  for i in range(T, 0, -1):
    eps = net.eps_hat(_grid_values(k, tab.delta[i]), tab.gamma[i], batch)
    centre = tab.p_centre[i - 1] * k
    k_prev = coder.pop(tab.p_half[i - 1], np.rint(centre),
                       centre - tab.p_eps[i - 1] * eps, tab.p_std[i - 1])
    mean = tab.q_coef[i] * k_prev
    coder.push(k, tab.q_half[i], np.rint(mean), mean, tab.q_std[i])
    k = k_prev
  x = coder.pop_x(net.x_probs(_grid_values(k, tab.delta[0]), batch))
  x = x.astype(np.int64).reshape(shape)
  mean = tab.q_coef[0] * _embed(x, vocab_size)
  coder.push(k, tab.q_half[0], np.rint(mean), mean, tab.q_std[0])
  return x


# ------------------------------------------------------------------ files
def _check_images(images, vocab_size: int) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or not np.issubdtype(images.dtype, np.integer) or not len(images):
    raise file_format.CodecError(
        f'images must be a non-empty integer array [N, H, W, C], got {images.dtype} '
        f'{images.shape}.')
  if images.min() < 0 or images.max() >= vocab_size:
    raise file_format.CodecError(
        f'image values must lie in 0..{vocab_size - 1} (the model\'s vocab_size), got '
        f'{images.min()}..{images.max()}.')
  return images.astype(np.int64)


def _first_pops_bits(tab: tables.CodingTable, dims: int) -> float:
  """Expected bits of an image's first two pops (z_0, z_1): its dip before any push."""
  return dims * (math.log2(tab.q_std[0] * tab.q_std[1]) + math.log2(2 * math.pi * math.e))


def _seed_size(tab: tables.CodingTable, dims: int, first_group: int) -> int:
  """Seed words for the first group's dip: its first two pops' supports, twice."""
  bits = dims * first_group * (math.log2(2 * tab.q_half[0] + 1) +
                               math.log2(2 * tab.q_half[1] + 1))
  return int(2 * bits / 32) + 64


def compress(model, params, images, *, timesteps: int = 400, batch_size: int = 64,
             first_group: int = 1, resolution: int = 8, first_resolution: int = 2,
             first_images: int = 8, support: int = 8, ideal_bits: bool = False) -> tuple[bytes, file_format.Report]:
  """Codes uint8/integer images [N, H, W, C] into one file (§9); returns (file, report).

  timesteps: T of the discrete-time model. batch_size: largest network batch.
  first_group: images in the first group, whose pops take the initial bits.
  resolution: grid bins per standard deviation; first_resolution: the same for the
  groups that start before image `first_images`, coarser so that their first pops need
  fewer initial bits until the stack holds enough (a coarse grid changes each KL by a
  relative δ²/(12σ²), on those images only); support: pop supports in stds.
  ideal_bits: also report each image's information content under the models coded
  (for paired comparisons with the bound; costs extra arithmetic).
  """
  start = time.perf_counter()
  vocab = int(model.config.vocab_size)
  images = _check_images(images, vocab)
  n, shape = len(images), images.shape[1:]
  dims = math.prod(shape)
  gamma = tables.gamma_grid(model, params, timesteps)
  tabs = (tables.coding_table(gamma, first_resolution, support),
          tables.coding_table(gamma, resolution, support))
  net = Network(model, params, shape, vocab, gamma[0])
  seed_size = _seed_size(tabs[0], dims, min(first_group, n))
  flat = images.reshape(n, dims)
  while True:
    seed = file_format.seed_words(seed_size)
    coder = _Coder(seed, ideal_bits=n if ideal_bits else None)
    seed_bits = coder.bits()
    floor, groups, pos = coder.bits(), [], 0
    dips = [None, None]  # Largest dip per image measured with each table.
    g = max(1, min(first_group, n, batch_size))
    while pos < n:
      before = coder.bits()
      coder.group_min_bits = before
      coder.image_offset = pos
      t = int(pos >= first_images)
      encode_group(coder, net, tabs[t], flat[pos:pos + g], vocab, bucket(g, batch_size))
      dips[t] = max(dips[t] or 0.0, (before - coder.group_min_bits) / g)
      floor = min(floor, coder.group_min_bits)
      groups.append(g)
      pos += g
      t = int(pos >= first_images)
      dip = dips[t] or 1.25 * _first_pops_bits(tabs[t], dims)
      g = int(min(batch_size, n - pos, max(1, (coder.bits() - floor) // max(dip, 1.0))))
    if coder.min_words > 4:
      break
    seed_size *= 4  # The seed ran dry: its draws were not from q. Start again.
  final = coder.ans.get_compressed()
  untouched = coder.min_words - 2
  while untouched > 0 and not np.array_equal(final[:untouched], seed[:untouched]):
    untouched -= 1
  payload = final[untouched:]
  header = file_format.Header(
      config_hash=file_format.config_hash(model.config),
      params_hash=file_format.params_hash(params), table_hash=_tables_digest(tabs),
      timesteps=timesteps, resolution=resolution, first_resolution=first_resolution,
      first_images=first_images, support=support, num_images=n,
      image_shape=tuple(shape), vocab_size=vocab, batch_size=batch_size,
      seed_words=seed_size, untouched_words=untouched, payload_words=len(payload),
      payload_hash=file_format.digest(np.asarray(payload, '<u4').tobytes()),
      images_hash=file_format.images_hash(images), group_sizes=tuple(groups),
      environment=file_format.environment())
  data = file_format.pack(header, payload)
  report = file_format.Report(
      num_images=n, dims_per_image=dims, timesteps=timesteps,
      net_bits=coder.bits() - seed_bits,
      initial_bits=32 * (seed_size - untouched), payload_bits=32 * len(payload),
      header_bits=8 * (len(data) - 4 * len(payload)), group_sizes=tuple(groups),
      seconds_network=net.seconds, seconds_coding=coder.seconds,
      seconds_total=time.perf_counter() - start, ideal_bits=coder.ideal)
  return data, report


def _tables_digest(tabs) -> bytes:
  return file_format.digest(*(t.digest() for t in tabs))


def read_header(data: bytes) -> file_format.Header:
  return file_format.unpack(data)[0]


def decompress(model, params, data: bytes, *, timesteps: Optional[int] = None,
               resolution: Optional[int] = None, first_resolution: Optional[int] = None,
               first_images: Optional[int] = None, support: Optional[int] = None,
               allow_other_environment: bool = False,
               timings: Optional[dict] = None) -> np.ndarray:
  """The images [N, H, W, C] of a file written by `compress`, bit-exact, in order.

  The coding settings come from the file; those given here must agree with it.
  `timings`, if a dict, receives seconds_network, seconds_coding and seconds_total.
  Raises file_format.CorruptFileError, MismatchError or DecodeCheckError.
  """
  start = time.perf_counter()
  header, payload = file_format.unpack(data)
  settings = dict(timesteps=timesteps, resolution=resolution,
                  first_resolution=first_resolution, first_images=first_images,
                  support=support)
  gamma = tables.gamma_grid(model, params, header.timesteps)
  tabs = (tables.coding_table(gamma, header.first_resolution, header.support),
          tables.coding_table(gamma, header.resolution, header.support))
  file_format.check_model(header, file_format.config_hash(model.config),
                           file_format.params_hash(params), settings, _tables_digest(tabs),
                           allow_other_environment)
  vocab, shape = header.vocab_size, header.image_shape
  dims = math.prod(shape)
  net = Network(model, params, shape, vocab, gamma[0])
  seed = file_format.seed_words(header.seed_words)
  coder = _Coder(np.concatenate([seed[:header.untouched_words], payload]))
  images = np.zeros((header.num_images, dims), np.int64)
  ends = np.cumsum(header.group_sizes)
  if not len(ends) or ends[-1] != header.num_images:
    raise file_format.CorruptFileError('The group sizes do not add up to N.')
  for g, end in zip(header.group_sizes[::-1], ends[::-1]):
    images[end - g:end] = decode_group(coder, net, tabs[int(end - g >= header.first_images)],
                                       (g, dims), vocab,
                                       bucket(g, header.batch_size))
  images = images.reshape((header.num_images,) + tuple(shape))
  if (not np.array_equal(coder.ans.get_compressed(), seed)
      or file_format.images_hash(images) != header.images_hash):
    raise file_format.DecodeCheckError(
        'Decoding did not reproduce the encoder\'s stream and images: the network '
        'outputs here differ from the encoder\'s (other device or software: '
        f'file "{header.environment}", here "{file_format.environment()}").')
  if timings is not None:
    timings.update(seconds_network=net.seconds, seconds_coding=coder.seconds,
                   seconds_total=time.perf_counter() - start)
  return images.astype(np.uint8 if vocab <= 256 else np.int32)
