r"""Second-order flow matching: a training term for the ODE's divergence (docs/maths.md §15.2).

The probability-flow ODE's likelihood integrates tr ∂ε̂/∂z (§10, (10.4)), which the bound
never trains. For the exact ε*(z) = E[ε | z_t = z], the second-order Tweedie identity
gives σ_t·tr ∂ε*/∂z = D − E[‖ε − ε*‖² | z_t], so the residual

    r = σ_t·vᵀ(∂ε̂/∂z)v − D + sg(‖ε − ε̂‖²),     v a Rademacher probe,        (15.4)

has mean zero given z_t when ε̂ = ε*, and the term added to each example's objective is

    L_2 = λ·c·r²/D,                                                         (15.5)

with c the coefficient of ‖ε − ε̂‖² in that example's unweighted diffusion term (½γ'(t),
½/p(γ), …, so that every time proposal weights it as it weights the bound) and λ =
model.second_order_weight. For a v-network (ε̂ = α_t v̂ + σ_t z) r = α_t·r_v with
r_v = σ_t vᵀ(∂v̂/∂z)v − α_t(D − ‖v − v̂‖²): the term is i-DODE's, written in ε.

    eps_hat, trace = second_order.score_and_trace(vdm_module, z_t, gamma_t, c, det)
    loss = second_order.loss(weight, trace, eps, eps_hat, gamma_t, loss_diff)

Fine-tuning a finished run (its workdir): train again with more steps and the term on,
`--config.training.num_steps=N --config.model.second_order_weight=0.1`; neither field
defines the model, so the checkpoint resumes without --allow_config_change.
"""

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_image_sum(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def hutchinson_trace(fn, z: jax.Array, probe: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(fn(z), vᵀ(∂fn/∂z)v per image [B]) from one forward-mode pass: E_v = tr ∂fn/∂z
  when E[vvᵀ] = I (Hutchinson); fn acts on each image separately."""
  out, jv = jax.jvp(fn, (z,), (probe,))
  return out, _per_image_sum(probe * jv).astype(jnp.float32)


def score_and_trace(module, z_t: jax.Array, gamma_t: jax.Array, conditioning,
                    deterministic: bool) -> tuple[jax.Array, Optional[jax.Array]]:
  """ε̂ = module.score(z_t, γ_t) and, when model.second_order_weight > 0, its Hutchinson
  trace with one Rademacher probe from the 'sample' stream (None otherwise)."""
  score = lambda mdl, z: mdl.score(z, gamma_t, conditioning, deterministic)
  if not module.config.second_order_weight:
    return score(module, z_t), None
  probe = jax.random.rademacher(module.make_rng('sample'), z_t.shape, z_t.dtype)
  # nn.jvp: jax.jvp lifted over the module's parameters (held fixed: no tangents).
  eps_hat, jv = nn.jvp(score, module, (z_t,), (probe,), {})
  return eps_hat, _per_image_sum(probe * jv).astype(jnp.float32)


def residual(trace: jax.Array, squared_error: jax.Array, sigma_t: jax.Array,
             num_dims: int) -> jax.Array:
  """r = σ_t·tr ∂ε̂/∂z − D + sg(‖ε − ε̂‖²) per example (15.4)."""
  return sigma_t * trace - num_dims + jax.lax.stop_gradient(squared_error)


def loss(weight: float, trace: Optional[jax.Array], eps: jax.Array, eps_hat: jax.Array,
         gamma_t: jax.Array, loss_diff: jax.Array) -> jax.Array:
  """L_2 = λ·c·r²/D per example [B] (15.5); zeros when the term is off (trace None).

  c = loss_diff/‖ε − ε̂‖², held fixed (the schedule learns from the bound alone).
  """
  if trace is None:
    return jnp.zeros_like(loss_diff)
  num_dims = math.prod(eps.shape[1:])
  squared_error = _per_image_sum(jnp.square(eps - eps_hat))
  positive = squared_error > 0
  c = jnp.where(positive, loss_diff / jnp.where(positive, squared_error, 1.0), 0.0)
  r = residual(trace, squared_error, jnp.sqrt(nn.sigmoid(gamma_t)), num_dims)
  return weight * jax.lax.stop_gradient(c) * jnp.square(r) / num_dims
