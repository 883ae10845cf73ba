"""The decoder p(x | z_0) and the embedding of integer data (docs/maths.md §1, §3).

f = 2·(x + ½)/V − 1 puts the V values at bin centres in (−1, 1); p(x_i | z_0) is a softmax
over the V centres with logits ℓ_v = −½·exp(−γ_0)·(u_i − e_v)², u = z_0/α_0, factorised over
the D sub-pixels.
"""

import functools

import jax
import jax.numpy as jnp


def encode(x: jax.Array, vocab_size: int) -> jax.Array:
  """f = 2·(x + ½)/V − 1: integers to bin centres in (−1, 1) (§1)."""
  return 2.0 * (jnp.round(x).astype(jnp.float32) + 0.5) / vocab_size - 1.0


def decoder_logits(u: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
  """ℓ_v = −½·exp(−γ_0)·(u − e_v)², e_v the bin centres; u = z_0/α_0 (§3). [..., V]."""
  e = encode(jnp.arange(vocab_size), vocab_size)
  return -0.5 * jnp.exp(-gamma_0) * jnp.square(u[..., None] - e)


def nearest_centre(u: jax.Array, vocab_size: int) -> jax.Array:
  """The bin centre e_v closest to u (clipped to the grid): where ℓ_v peaks (§3)."""
  v = jnp.clip(jnp.round(((u + 1.0) * vocab_size - 1.0) / 2.0), 0, vocab_size - 1)
  return encode(v, vocab_size)


def _logit_gap(u, c, e, gamma_0):
  """ℓ_e − ℓ_c = −½·exp(−γ_0)·r with r = (u − e)² − (u − c)² = (c − e)(2u − e − c),
  written as a product so that no large squares cancel (c: the nearest centre)."""
  r = (c - e) * (2.0 * u - e - c)
  # Scaled last: in this order XLA keeps the [..., V] gaps inside the reduction's loop
  # (tests/test_vdm.py checks the gradient's memory).
  return -0.5 * jnp.exp(-gamma_0) * r


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def decoder_log_normaliser(u: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
  """log Σ_v exp(ℓ_v − ℓ_c), the softmax normaliser relative to the largest logit ℓ_c.

  One reduction over v whose [..., V] terms XLA fuses into the loop; the derivative
  (below) adds two more sums to the same loop, so that neither the forward nor the
  backward pass writes a [..., V] array (autodiff of a log_softmax stores the P·V
  softmax, and the profile of the MNIST train step showed the V = 256 decoder taking
  ~8% of the step).
  """
  c = nearest_centre(u, vocab_size)[..., None]
  e = encode(jnp.arange(vocab_size), vocab_size)
  return jnp.log(jnp.sum(jnp.exp(_logit_gap(u[..., None], c, e, gamma_0)), axis=-1))


@decoder_log_normaliser.defjvp
def _decoder_log_normaliser_jvp(vocab_size, primals, tangents):
  # With p_v the softmax weights: ∂/∂u = exp(−γ_0)·Σ_v p_v (e_v − c) and
  # ∂/∂γ_0 = ½·exp(−γ_0)·Σ_v p_v r_v = −Σ_v p_v (ℓ_v − ℓ_c) (the terms in c cancel
  # against ℓ_c).
  # The three sums are one variadic reduction, so that XLA fuses them into one loop
  # instead of writing exp(ℓ_v − ℓ_c) out for three consumers.
  u, gamma_0 = primals
  du, dgamma_0 = tangents
  c = nearest_centre(u, vocab_size)[..., None]
  e = encode(jnp.arange(vocab_size), vocab_size)
  gaps = _logit_gap(u[..., None], c, e, gamma_0)
  w = jnp.exp(gaps)
  zero = jnp.zeros((), w.dtype)
  z, w_e, w_gaps = jax.lax.reduce(
      (w, w * (e - c), w * gaps), (zero, zero, zero),
      lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), (w.ndim - 1,))
  return jnp.log(z), (jnp.exp(-gamma_0) * w_e / z) * du - (w_gaps / z) * dgamma_0


def decoder_log_prob(x: jax.Array, u: jax.Array, gamma_0: jax.Array,
                     vocab_size: int) -> jax.Array:
  """log p(x_i | z_0) = ℓ_x − log Σ_v exp ℓ_v per sub-pixel, factorised over the D
  sub-pixels (§3); computed relative to the largest logit ℓ_c, without gathering."""
  c = jax.lax.stop_gradient(nearest_centre(u, vocab_size))
  gap_x = _logit_gap(u, c, encode(x, vocab_size), gamma_0)  # ℓ_x − ℓ_c
  return gap_x - decoder_log_normaliser(u, gamma_0, vocab_size)
