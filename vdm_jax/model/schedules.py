"""Noise schedules γ(t): the negative log signal-to-noise ratio (docs/maths.md §2).

γ is increasing on t ∈ [0, 1]; σ_t² = sigmoid(γ_t), α_t² = sigmoid(−γ_t). Every
schedule accepts Python scalars and arrays of t alike and returns an array of the
same shape. The parameters live under the module name `gamma` (the VDM sets it).

`learned_nnet` with `pinned` endpoints is written as γ(t) = γ_0 + (γ_1 − γ_0)·s(t),
with a normalised shape s(t) ∈ [0, 1], s(0) = 0 and s(1) = 1 exactly; §4 trains the
shape s separately from the endpoints, so the shape is exposed on its own.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

SCHEDULES = ('fixed_linear', 'learned_linear', 'learned_nnet')
ENDPOINTS = ('free', 'pinned')


def _as_array(t) -> jax.Array:
  return jnp.asarray(t, dtype=jnp.float32)


class FixedLinear(nn.Module):
  """γ(t) = γ_min + (γ_max − γ_min)·t, no parameters (§2)."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  def __call__(self, t) -> jax.Array:
    return self.gamma_min + (self.gamma_max - self.gamma_min) * _as_array(t)


class LearnedLinear(nn.Module):
  """γ(t) = b + |w|·t, the original's `learnable_scalar` (§2); `w`, `b` of shape (1,)."""
  gamma_min: float = -13.3
  gamma_max: float = 5.0

  @nn.compact
  def __call__(self, t) -> jax.Array:
    w = self.param('w', nn.initializers.constant(self.gamma_max - self.gamma_min), (1,))
    b = self.param('b', nn.initializers.constant(self.gamma_min), (1,))
    return b[0] + jnp.abs(w[0]) * _as_array(t)


class DenseMonotone(nn.Module):
  """A Dense layer whose effective kernel is |kernel|: non-decreasing in its input."""
  features: int
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.normal(stddev=0.01)
  bias_init: Callable[..., Any] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    y = x @ jnp.abs(kernel)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,))
    return y


class LearnedNNet(nn.Module):
  """The original's monotone `learnable_nnet` schedule, free or pinned endpoints (§2).

  γ̃(t) = l1(t) + l3(φ(l2(2t − 1)))/1024, φ(h) = 2·sigmoid(h) − 1, all kernels |·|.
  free:   γ(t) = γ̃(t).
  pinned: γ(t) = (1 − s(t))·γ_0 + s(t)·γ_1, s(t) = (γ̃(t) − γ̃(0))/(γ̃(1) − γ̃(0)).
  """
  gamma_min: float = -13.3
  gamma_max: float = 5.0
  endpoints: str = 'free'
  n_features: int = 1024

  def setup(self):
    self.l1 = DenseMonotone(
        1, kernel_init=nn.initializers.constant(self.gamma_max - self.gamma_min),
        bias_init=nn.initializers.constant(self.gamma_min))
    self.l2 = DenseMonotone(self.n_features)
    self.l3 = DenseMonotone(1, use_bias=False)
    if self.endpoints == 'pinned':
      self.gamma_0 = self.param(
          'gamma_0', nn.initializers.constant(self.gamma_min), ())
      self.gamma_1 = self.param(
          'gamma_1', nn.initializers.constant(self.gamma_max), ())
    elif self.endpoints != 'free':
      raise ValueError(f'schedule_endpoints must be one of {ENDPOINTS}, got '
                       f'{self.endpoints!r}.')

  def gamma_tilde(self, t) -> jax.Array:
    """The unnormalised monotone network γ̃(t), any shape of t."""
    t = _as_array(t)
    h = t.reshape(-1, 1)
    out = self.l1(h)
    nonlinear = 2.0 * nn.sigmoid(self.l2(2.0 * h - 1.0)) - 1.0
    out = out + self.l3(nonlinear) / self.n_features
    return out.reshape(t.shape)

  def shape(self, t) -> jax.Array:
    """s(t) ∈ [0, 1] with s(0) = 0, s(1) = 1: the pinned schedule's shape (§2, §4)."""
    t = _as_array(t)
    g = self.gamma_tilde(jnp.stack([jnp.zeros(()), jnp.ones(())]))
    s = (self.gamma_tilde(t) - g[0]) / (g[1] - g[0])
    # Exact 0 and 1 at the ends, whatever the float rounding of γ̃; value only, so
    # that derivatives are untouched (x + (1 − x) == 1 exactly in floating point).
    fix = jnp.where(t >= 1.0, 1.0 - s, jnp.where(t <= 0.0, -s, 0.0))
    return s + jax.lax.stop_gradient(fix)

  def endpoints_value(self):
    """(γ_0, γ_1) of the pinned schedule."""
    return self.gamma_0, self.gamma_1

  def __call__(self, t) -> jax.Array:
    if self.endpoints == 'free':
      return self.gamma_tilde(t)
    return interpolate(self.gamma_0, self.gamma_1, self.shape(t))


def interpolate(gamma_0, gamma_1, s):
  """γ = γ_0 + (γ_1 − γ_0)·s, written (1 − s)·γ_0 + s·γ_1 so that s ∈ {0, 1} is exact."""
  return (1.0 - s) * gamma_0 + s * gamma_1


def make_schedule(config, name: Optional[str] = 'gamma') -> nn.Module:
  """The schedule module chosen by `config.model` (§2)."""
  kwargs = dict(gamma_min=config.gamma_min, gamma_max=config.gamma_max, name=name)
  if config.schedule == 'fixed_linear':
    return FixedLinear(**kwargs)
  if config.schedule == 'learned_linear':
    return LearnedLinear(**kwargs)
  if config.schedule == 'learned_nnet':
    return LearnedNNet(endpoints=config.schedule_endpoints, **kwargs)
  raise ValueError(f'model.schedule must be one of {SCHEDULES}, got '
                   f'{config.schedule!r}.')


def gamma_and_derivative(gamma_fn: Callable[[jax.Array], jax.Array], t):
  """(γ(t), γ'(t)) by forward-mode differentiation (jax.jvp), never finite differences."""
  t = _as_array(t)
  return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


# ------------------------------------------------ §4 the shape trained for low variance
@jax.custom_vjp
def variance_gradient_carrier(shape_values, carrier):
  """Identity on (shape_values, carrier) whose VJP turns ∂L/∂η into ∂(L²)/∂η (§4).

  `carrier` is a zeros [B, 2] array that the objective uses as
  carrier[:, 0]·stop_gradient(L_i) + carrier[:, 1], so its cotangent arrives as
  (w_i·L_i, w_i), w_i the weight of example i in the reduced objective. The cotangent
  of each example's shape values, w_i·∂L_i/∂s, is multiplied by 2·L_i = 2·(w_i·L_i)/w_i:
  the shape parameters then receive Σ_i w_i·∂(L_i²)/∂η in the same backward pass.
  """
  return shape_values, carrier


def _carrier_fwd(shape_values, carrier):
  return (shape_values, carrier), None


def _carrier_bwd(_, cotangents):
  g_shape, g_carrier = cotangents
  weight = g_carrier[:, 1]
  two_loss = 2.0 * g_carrier[:, 0] / jnp.where(weight == 0, 1.0, weight)
  scale = lambda g: g * two_loss.reshape((-1,) + (1,) * (g.ndim - 1))
  return jax.tree.map(scale, g_shape), jnp.zeros_like(g_carrier)


variance_gradient_carrier.defvjp(_carrier_fwd, _carrier_bwd)
