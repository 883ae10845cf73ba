"""Rematerialisation of a Flax module call that survives XLA's CSE on every backend.

`nn.remat` (jax.checkpoint) fences the backward pass's recomputation with an
optimization_barrier. XLA:CPU removes those barriers early (its
`cse_barrier_expander` pass) and a later CSE pass then merges the recomputation
with the forward pass, so every intermediate is kept alive after all: no saving.

`remat_call` instead defines the call's VJP by hand: the forward pass keeps
only the call's inputs (plus the variables and rngs, which are alive anyway), and
the backward pass recomputes the call from inputs that it first ties to the
incoming cotangent (x + 0·g[0]). The recomputation then differs from the forward
computation as far as any compiler can tell, so nothing merges it away, and it
cannot start before its cotangent exists, so no schedule keeps its intermediates
alive for long. Adding 0·g[0] leaves every finite input unchanged (−0 becomes +0);
a non-finite cotangent makes the gradients non-finite, as they would be anyway.
The cotangents of the call's inputs are materialised before they leave the
backward pass (`_materialize`), so that nothing larger stays alive for them.

The recomputation applies the module to the variables and rngs of its own scope
(rngs as flax LazyRngs, so each key folds in the same path and counter), hence
draws the same dropout mask as the forward pass.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def depends_on(key: jax.Array, x: jax.Array) -> jax.Array:
  """The PRNG key `key`, made to depend on the array x without changing its value.

  Adds [x₀ ≠ x₀] (0 unless x's first element is NaN) to the key's data. Random
  bits drawn from the result cannot be generated before x exists, so a compiler
  cannot hoist them to the start of the program, nor share them with bits drawn
  from `key` elsewhere.
  """
  x0 = x.ravel()[0]
  nan = (x0 != x0).astype(jnp.uint32)
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jax.random.key_data(key) + nan,
                                    impl=jax.random.key_impl(key))
  return key + nan  # a raw uint32 key


def _tie(tree: Any, g: Any) -> Any:
  """tree, made to depend on g without changing any value.

  Floating leaves get 0·g₀ added (g₀ = g's first element); PRNG keys go through
  `depends_on`, so that dropout masks, which depend on the key only, are drawn
  again too instead of being kept from the forward pass.
  """
  g0 = jax.tree.leaves(g)[0]

  def tie(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) or x.dtype == jnp.uint32:
      return depends_on(x, g0)
    if jnp.issubdtype(x.dtype, jnp.floating):
      return x + (0.0 * g0.ravel()[0]).astype(x.dtype)
    return x

  return jax.tree.map(tie, tree)


def _materialize(tree: Any, g: Any) -> Any:
  """tree, computed here and now: the outputs of a conditional on g₀ = g₀.

  The cotangents of a call's inputs are typically cheap functions (slices, sums)
  of larger arrays; left alone, XLA fuses them into their consumers, which for a
  U-Net's skip connections run much later, and keeps those larger arrays alive
  until then (measured: 3 two-channel-width arrays per up block). A conditional's
  operands are buffers, so they are computed before it. The false branch (a NaN
  cotangent) returns NaNs, as the gradient would be anyway; it differs from the
  true branch so that XLA cannot simplify the conditional away.
  """
  g0 = jax.tree.leaves(g)[0].ravel()[0]
  nans = lambda t: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), t)
  return jax.lax.cond(g0 == g0, lambda t: t, nans, tree)


def remat_call(fn: Callable[..., Any], module: nn.Module, *args: Any) -> Any:
  """`fn(module, *args)`, keeping only `args` for the backward pass, which recomputes it.

  `fn` calls the (unbound, named) `module` and may do more around it, e.g. build its
  input from several arrays, so that only those are kept. args are pytrees of
  arrays; Python values (`deterministic`) go in `fn`'s closure. Only 'params' is
  differentiated, and `fn` must not mutate variables. Parameter names, rngs and
  values are those of the plain call `fn(module, *args)`.
  """
  def forward(mdl, *xs):
    params = mdl.variables.get('params', {})
    others = {k: v for k, v in mdl.variables.items() if k != 'params'}
    return fn(mdl, *xs), (params, others, dict(mdl.scope.rngs), xs)

  def backward(res, g):
    params, others, rngs, xs = res
    xs, rngs = _tie((xs, rngs), g)
    unbound = module.clone(parent=None)

    def pure(p, *inputs):
      return unbound.apply({'params': p, **others}, *inputs, method=fn,
                           rngs=rngs or None)

    _, vjp = jax.vjp(pure, params, *xs)
    params_t, *inputs_t = vjp(g)
    return ({'params': params_t}, *_materialize(inputs_t, g))

  return nn.custom_vjp(fn, forward, backward)(module, *args)
