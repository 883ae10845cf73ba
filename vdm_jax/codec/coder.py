"""Bits-back coding of images with the discrete-time model on an ANS stack (§9).

docs/maths.md §9. The latent-variable model p(z_1) Π_i p(z_{i-1} | z_i) p(x | z_0) of T
steps (z_i at t = i/T), with the forward chain as the approximate posterior, coded on an
ANS stack (constriction) in the order that needs initial bits only for the first pops:

    encode:  pop z_0 ~ q(z_0|x); push x ~ p(x|z_0);
             for i = 1..T: pop z_i ~ q(z_i|z_{i-1}); push z_{i-1} ~ p(z_{i-1}|z_i);
             push z_T ~ N(0, I).
    decode:  the same steps in reverse, pushes and pops exchanged.

Latents live on grids z_i = k_i·δ_i, δ_i a fixed fraction of the standard deviations
coded at level i, and are coded as integer offsets from a reference point that the
decoder can compute. The network sees the grid values, so encoder and decoder compute
the same ε̂ bit for bit. Images are coded in groups, one batched network call per step
per group; each group is as large as the bits already on the stack allow its first
pops to take without digging below a floor (bounded by the batch). compressor.py puts
the images in files.
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

  def __init__(self, model, params, image_shape, vocab_size: int, gamma_0: float,
               compiler_options: Optional[dict] = None):
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

    self._eps_hat = jax.jit(eps_hat, compiler_options=compiler_options)
    self._x_probs = jax.jit(x_probs, compiler_options=compiler_options)

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
class AnsStack:
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


def encode_group(coder: AnsStack, net: Network, tab: tables.CodingTable, x: np.ndarray,
                 vocab_size: int, batch: int, advance=None) -> None:
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
    if advance:
      advance(len(x))
  zero = np.zeros(k.shape)
  coder.push(k, tab.p_half[T], zero, zero, tab.p_std[T])


def decode_group(coder: AnsStack, net: Network, tab: tables.CodingTable, shape,
                 vocab_size: int, batch: int, advance=None) -> np.ndarray:
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
    if advance:
      advance(shape[0])
  x = coder.pop_x(net.x_probs(_grid_values(k, tab.delta[0]), batch))
  x = x.astype(np.int64).reshape(shape)
  mean = tab.q_coef[0] * _embed(x, vocab_size)
  coder.push(k, tab.q_half[0], np.rint(mean), mean, tab.q_std[0])
  return x




# ------------------------------------------------------------------ groups
def first_pops_bits(tab: tables.CodingTable, dims: int) -> float:
  """Expected bits of an image's first two pops (z_0, z_1): its dip before any push."""
  return dims * (math.log2(tab.q_std[0] * tab.q_std[1]) + math.log2(2 * math.pi * math.e))


def _table(position: int, first_images: int) -> int:
  """Which table codes the group starting at bits-back image `position`."""
  return int(position >= first_images)


def encode_images(coder: AnsStack, net: Network, tabs, flat: np.ndarray, vocab_size: int,
                  batch_size: int, first_group: int, first_images: int, floor: int,
                  advance=None) -> tuple:
  """Pushes the images flat [n, D] group by group; returns the group sizes.

  Each group is as large as the bits above `floor` allow its images' first pops to
  take at once (at least `first_group` images for the first), measured on the groups
  coded before with the same table (§9); what digs below the floor lowers it.
  """
  n, dims = flat.shape
  groups, pos, dips = [], 0, [None, None]
  while pos < n:
    t = _table(pos, first_images)
    dip = dips[t] or 1.25 * first_pops_bits(tabs[t], dims)
    fits = (coder.bits() - floor) // max(dip, 1.0)
    g = int(min(batch_size, n - pos, max(first_group if not pos else 1, fits)))
    before = coder.group_min_bits = coder.bits()
    coder.image_offset = pos
    encode_group(coder, net, tabs[t], flat[pos:pos + g], vocab_size,
                 bucket(g, batch_size), advance)
    dips[t] = max(dips[t] or 0.0, (before - coder.group_min_bits) / g)
    floor = min(floor, coder.group_min_bits)
    groups.append(g)
    pos += g
  return tuple(groups)


def decode_images(coder: AnsStack, net: Network, tabs, groups, dims: int, vocab_size: int,
                  batch_size: int, first_images: int, advance=None) -> np.ndarray:
  """Pops the images [sum(groups), D] of `encode_images`, last group first."""
  ends = np.cumsum(groups)
  images = np.zeros((int(ends[-1]), dims), np.int64)
  for g, end in zip(groups[::-1], ends[::-1]):
    images[end - g:end] = decode_group(coder, net, tabs[_table(end - g, first_images)],
                                       (g, dims), vocab_size, bucket(g, batch_size),
                                       advance)
  return images
