"""The noise-prediction network ε̂_θ(z_t, γ_t): the original U-Net (docs/maths.md §6).

With model.channel_mult = (1,) the paper's U-Net, without any change of resolution
(docs/maths.md §6.5); a longer channel_mult adds resolutions (§6.6, not in the paper).
With model.prediction = 'v' the same network predicts v = α_t·ε − σ_t·f instead, without
the residual z at its output (§11.1); the VDM turns v̂ into ε̂.
Module and parameter names follow the original code exactly (`dense0`, `conv_in`, `down.block_{i}`, `mid.attn_1`, …), so
that the original checkpoints load by mapping trees alone.
"""

import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.model import remat


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
  """Sinusoidal embedding of 1000·t, sines then cosines (§6). t: [B] → [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  arg = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def fourier_features(z: jax.Array, n_min: int, n_max: int) -> jax.Array:
  """[sin(2^n π z), cos(2^n π z)] for n = n_min..n_max, channel-major (§6)."""
  n = jnp.arange(n_min, n_max + 1, dtype=jnp.float32)
  w = (2.0 ** n) * jnp.pi                                   # [N]
  h = jnp.repeat(z, len(n), axis=-1) * jnp.tile(w, z.shape[-1])  # c0n0, c0n1, c1n0, …
  return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


class Dropout(nn.Module):
  """flax's nn.Dropout (same masks, same rng path), drawing its mask only once x exists.

  The key is tied to x (`remat.depends_on`), so XLA cannot generate every block's
  random bits at the start of the step and keep them alive until they are used (it
  does so with nn.Dropout: 2 arrays of x's size per block, which dominated the
  memory of the rematerialised cifar10 step).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if self.rate == 0.0 or deterministic:
      return x
    keep_prob = 1.0 - self.rate
    if keep_prob == 0.0:
      return jnp.zeros_like(x)
    key = remat.depends_on(self.make_rng('dropout'), x)
    keep = jax.random.bernoulli(key, p=keep_prob, shape=x.shape)
    return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


def conv3x3(features: int, dtype, zero_init: bool = False, name: Optional[str] = None):
  """3×3 SAME convolution with bias (XLA's), kernel HWIO; zero_init for output layers."""
  kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(features, (3, 3), padding='SAME', kernel_init=kernel_init, dtype=dtype,
                 name=name)


class ResnetBlock(nn.Module):
  """GroupNorm → swish → conv1 → + cond_proj(cond) → GroupNorm → swish → dropout → conv2, + skip (§6)."""
  out_ch: Optional[int] = None
  p_drop: float = 0.1
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, deterministic: bool) -> jax.Array:
    c_in = x.shape[-1]
    out_ch = c_in if self.out_ch is None else self.out_ch
    h = nn.swish(nn.GroupNorm(self.groups, dtype=self.dtype, name='GroupNorm_0')(x))
    h = conv3x3(out_ch, self.dtype, name='conv1')(h)
    h = h + nn.Dense(out_ch, use_bias=False, kernel_init=nn.initializers.zeros,
                     dtype=self.dtype, name='cond_proj')(cond)[:, None, None, :]
    h = nn.swish(nn.GroupNorm(self.groups, dtype=self.dtype, name='GroupNorm_1')(h))
    h = Dropout(self.p_drop, name='Dropout_0')(h, deterministic)
    h = conv3x3(out_ch, self.dtype, zero_init=True, name='conv2')(h)
    if c_in != out_ch:
      x = nn.Dense(out_ch, dtype=self.dtype, name='nin_shortcut')(x)
    return x + h


ATTENTION_IMPLS = ('auto', 'batched', 'chunked')


def resolve_attention_impl(impl: str) -> str:
  """'batched' or 'chunked'; 'auto' is 'chunked' on CPU, 'batched' elsewhere."""
  if impl == 'auto':
    return 'chunked' if jax.default_backend() == 'cpu' else 'batched'
  if impl in ('batched', 'chunked'):
    return impl
  raise ValueError(f'attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}')


def images_per_chunk(batch: int, positions: int) -> int:
  """The smallest divisor m of `batch` whose m·N² attention weights reach 2^20 (4 MiB
  in float32): small enough for the CPU's cache, large enough to amortise the loop."""
  for m in range(1, batch + 1):
    if batch % m == 0 and m * positions ** 2 >= 2 ** 20:
      return m
  return batch


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          chunk: int = 0) -> jax.Array:
  """softmax(q kᵀ / √C) v for [B, N, C] arrays, the softmax in float32 (§6).

  chunk > 0 computes it for `chunk` images at a time in a loop (lax.map), so that
  each chunk's [N, N] weights stay in cache instead of B·N² floats going through
  memory several times, and the backward pass recomputes each chunk's weights
  (jax.checkpoint) instead of storing all B·N² of them: on the 2-core CPU at 28×28,
  batch 32, this runs the forward pass 2.0× and forward + backward 3.5× faster than
  the batched form, with 12× less temporary memory. The chunks interleave the batch
  (chunk j holds images j, j + B/chunk, …) so that a batch sharded over devices
  stays sharded the same way.
  """
  def attend(q, k, v):
    logits = jnp.einsum('bqc,bkc->bqk', q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bqk,bkc->bqc', weights, v)

  b = q.shape[0]
  if chunk <= 0 or chunk >= b:
    return attend(q, k, v)
  if b % chunk:
    raise ValueError(f'attention chunk {chunk} does not divide the batch {b}')
  loops = b // chunk
  split = lambda x: jnp.moveaxis(x.reshape(chunk, loops, *x.shape[1:]), 1, 0)
  attend_chunk = jax.checkpoint(attend)
  out = jax.lax.map(lambda qkv: attend_chunk(*qkv), (split(q), split(k), split(v)))
  return jnp.moveaxis(out, 0, 1).reshape(b, *out.shape[2:])


class AttnBlock(nn.Module):
  """One-head self-attention over all H·W positions, scale 1/√C, zero-init output (§6)."""
  groups: int = 32
  dtype: Any = jnp.float32
  impl: str = 'auto'  # see resolve_attention_impl

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = nn.GroupNorm(self.groups, dtype=self.dtype, name='GroupNorm_0')(x)
    q = nn.Dense(c, dtype=self.dtype, name='q')(h).reshape(b, height * width, c)
    k = nn.Dense(c, dtype=self.dtype, name='k')(h).reshape(b, height * width, c)
    v = nn.Dense(c, dtype=self.dtype, name='v')(h).reshape(b, height * width, c)
    chunk = (images_per_chunk(b, height * width)
             if resolve_attention_impl(self.impl) == 'chunked' else 0)
    h = dot_product_attention(q, k, v, chunk).reshape(b, height, width, c)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                 name='proj_out')(h)
    return x + h


def downsample(x: jax.Array) -> jax.Array:
  """2×2 average pooling: [B, H, W, C] → [B, H/2, W/2, C]."""
  b, height, width, c = x.shape
  return x.reshape(b, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
  """Nearest-neighbour ×2 in H and W, then a 3×3 convolution (as in DDPM's U-Net)."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv3x3(x.shape[-1], self.dtype, name='conv')(x)


class ScoreUNet(nn.Module):
  """ε̂_θ(z_t, γ_t, conditioning), the original topology and names (§6).

  With `channel_mult = (1,)` (the default) this is the paper's network: every block
  at full resolution with n_embd channels. A longer `channel_mult` adds resolutions,
  which the paper does not use: n_layer blocks of n_embd·channel_mult[l] channels at
  H/2^l × W/2^l, 2×2 average pooling between them on the way down, nearest ×2 and a
  3×3 convolution (`up.upsample_l`) on the way up, the middle blocks at the lowest
  resolution (a DDPM-style U-Net, for small-compute runs such as the MNIST default).
  Block names count on across resolutions, so (1,) keeps the original's names.

  Attributes mirror `config.model`: see vdm_jax/config_base.py.
  """
  n_embd: int = 128
  n_layer: int = 32
  channel_mult: tuple[int, ...] = (1,)
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  with_fourier_features: bool = True
  fourier_n_min: int = 7
  fourier_n_max: int = 8
  with_attention: bool = False
  p_drop: float = 0.1
  groups: int = 32
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str = 'auto'
  residual: bool = True  # add z to the output: ε̂ ≈ z at the noisy end (ε-prediction, §6)

  @nn.compact
  def __call__(self, z: jax.Array, gamma_t: jax.Array, conditioning: jax.Array,
               deterministic: bool = True, latent: Optional[jax.Array] = None) -> jax.Array:
    batch = z.shape[0]
    # Conditioning vector: t_n = (γ_t − γ_min)/(γ_max − γ_min), embedded, + the flag
    # (+ the [B, K] latent of a mulan schedule, docs/maths.md §13.2).
    t_n = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
    t_n = jnp.broadcast_to(jnp.asarray(t_n, jnp.float32), (batch,))
    temb = timestep_embedding(t_n, self.n_embd)
    cond = [temb, conditioning.astype(jnp.float32)[:, None]]
    if latent is not None:
      cond.append(latent.astype(jnp.float32))
    cond = jnp.concatenate(cond, axis=1)
    cond = nn.swish(nn.Dense(4 * self.n_embd, dtype=self.dtype, name='dense0')(cond))
    cond = nn.swish(nn.Dense(4 * self.n_embd, dtype=self.dtype, name='dense1')(cond))

    # Input features: z and, optionally, its Fourier features.
    h = z
    if self.with_fourier_features:
      h = jnp.concatenate(
          [z, fourier_features(z, self.fourier_n_min, self.fourier_n_max)], axis=-1)
    h = h.astype(self.dtype)

    # remat: each block keeps only its inputs; the backward pass recomputes it.
    call = remat.remat_call if self.remat else lambda fn, m, *a: fn(m, *a)
    res = lambda m, x, c: m(x, c, deterministic)
    # The skip concatenation inside the call: remat keeps h, not a 2C-channel copy.
    res_up = lambda m, x, skip, c: m(
        jnp.concatenate([x, skip], axis=-1), c, deterministic)
    attn = lambda m, x: m(x)
    attn_block = functools.partial(AttnBlock, self.groups, self.dtype, self.attention_impl)
    block_kw = dict(p_drop=self.p_drop, groups=self.groups, dtype=self.dtype)

    mults = tuple(self.channel_mult)
    h = conv3x3(self.n_embd * mults[0], self.dtype, name='conv_in')(h)
    hs = [h]
    i = 0
    for level, mult in enumerate(mults):
      for _ in range(self.n_layer):
        h = call(res, ResnetBlock(self.n_embd * mult, name=f'down.block_{i}', **block_kw),
                 hs[-1], cond)
        if self.with_attention:
          h = call(attn, attn_block(name=f'down.attn_{i}'), h)
        hs.append(h)
        i += 1
      if level < len(mults) - 1:
        hs.append(downsample(hs[-1]))

    h = hs[-1]
    h = call(res, ResnetBlock(name='mid.block_1', **block_kw), h, cond)
    h = call(attn, attn_block(name='mid.attn_1'), h)
    h = call(res, ResnetBlock(name='mid.block_2', **block_kw), h, cond)

    i = 0
    for level in reversed(range(len(mults))):
      for _ in range(self.n_layer + 1):
        h = call(res_up, ResnetBlock(self.n_embd * mults[level], name=f'up.block_{i}',
                                     **block_kw), h, hs.pop(), cond)
        if self.with_attention:
          h = call(attn, attn_block(name=f'up.attn_{i}'), h)
        i += 1
      if level > 0:
        h = Upsample(self.dtype, name=f'up.upsample_{level}')(h)
    assert not hs

    h = nn.swish(nn.GroupNorm(self.groups, dtype=self.dtype, name='GroupNorm_0')(h))
    out = conv3x3(z.shape[-1], self.dtype, zero_init=True, name='conv_out')(h)
    return out.astype(jnp.float32) + z if self.residual else out.astype(jnp.float32)


def make_score_model(config, name: Optional[str] = 'score_model') -> ScoreUNet:
  """The network described by `config.model` (§6)."""
  return ScoreUNet(
      n_embd=config.n_embd, n_layer=config.n_layer,
      channel_mult=tuple(config.channel_mult), gamma_min=config.gamma_min,
      gamma_max=config.gamma_max, with_fourier_features=config.with_fourier_features,
      fourier_n_min=config.fourier_n_min, fourier_n_max=config.fourier_n_max,
      with_attention=config.with_attention, p_drop=config.p_drop,
      groups=config.groupnorm_groups, dtype=jnp.dtype(config.dtype),
      remat=config.remat, attention_impl=config.attention_impl,
      residual=config.prediction == 'eps', name=name)
