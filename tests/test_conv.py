"""Tests of vdm_jax.conv: both impls against lax, the module against nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import conv

# (B, H, W, Cin, Cout): odd H != W, Cin != Cout both ways, batch 1, a 1x1
# image (every tap but the centre reads padding), the U-Net's concat input.
SHAPES = [(1, 7, 5, 3, 6), (3, 6, 9, 16, 8), (1, 1, 1, 2, 3), (2, 5, 4, 64, 32)]

# Float32 rounding (eps = 2^-23 ~ 1.2e-7): two summation orders of n products
# differ by at most ~n*eps times the sum of the absolute terms, and typically
# by ~sqrt(n)*eps times it. The longest sums here are the forward's 9*64 = 576
# terms (sqrt(n)*eps = 2.9e-6) and the kernel gradient's B*H*W <= 162, so we
# allow 1e-5 of the sum over |terms| (observed: <= 2e-7); a wrong tap, flip or
# transpose is an O(1) error.
RTOL_ABS_TERMS = 1e-5


def _lax_conv(x, k):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _normal(seed, *shape):
  # NumPy draws: eager jax.random would compile a program per shape.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _data(shape, seed=0):
  b, h, w, cin, cout = shape
  return (_normal(seed, b, h, w, cin), _normal(seed + 1, 3, 3, cin, cout),
          _normal(seed + 2, b, h, w, cout))


def _assert_close(got, want, abs_terms):
  assert got.shape == want.shape and got.dtype == want.dtype
  err = np.max(np.abs(np.asarray(got) - np.asarray(want)))
  scale = np.max(np.asarray(abs_terms))
  assert err <= RTOL_ABS_TERMS * scale, (err, scale)


def _assert_float32(tree):
  for leaf in jax.tree.leaves(tree):
    assert leaf.dtype == jnp.float32, leaf.dtype


def test_resolve_impl():
  assert conv.resolve_impl('xla') == 'xla'
  assert conv.resolve_impl('patches') == 'patches'
  assert conv.resolve_impl('auto') in ('xla', 'patches')
  with pytest.raises(ValueError) as e:
    conv.resolve_impl('winograd')
  for name in ('xla', 'patches', 'auto', 'winograd'):
    assert name in str(e.value)


@jax.jit
def _both_ways(x, k, g):
  """Outputs and vjps of 'patches', 'xla' and lax, and the sums over |terms|."""
  y, vjp = jax.vjp(lambda x, k: conv.conv3x3(x, k, 'patches'), x, k)
  y_xla = conv.conv3x3(x, k, 'xla')
  y_ref, vjp_ref = jax.vjp(_lax_conv, x, k)
  abs_y, vjp_abs = jax.vjp(_lax_conv, jnp.abs(x), jnp.abs(k))
  return ((y, y_xla, y_ref, abs_y), (vjp(g), vjp_ref(g), vjp_abs(jnp.abs(g))))


@pytest.mark.parametrize('shape', SHAPES)
def test_matches_lax(shape):
  """Forward of both impls, and the 'patches' vjp w.r.t. x and kernel."""
  (y, y_xla, y_ref, abs_y), grads = _both_ways(*_data(shape))
  _assert_close(y, y_ref, abs_y)
  _assert_close(y_xla, y_ref, abs_y)
  (dx, dk), (dx_ref, dk_ref), (abs_dx, abs_dk) = grads
  _assert_close(dx, dx_ref, abs_dx)
  _assert_close(dk, dk_ref, abs_dk)


def test_bad_shapes_raise():
  x = np.zeros((1, 4, 4, 3), np.float32)
  with pytest.raises(ValueError):
    conv.conv3x3(x, np.zeros((3, 3, 2, 2), np.float32), 'patches')
  with pytest.raises(ValueError):
    conv.conv3x3(x, np.zeros((2, 3, 3, 2), np.float32), 'patches')
  with pytest.raises(ValueError):
    conv.conv3x3(x[0], np.zeros((3, 3, 3, 2), np.float32), 'patches')


def test_module_params_match_nn_conv():
  x = jnp.zeros((2, 5, 7, 3))
  key = jax.random.PRNGKey(1)
  zero_init = conv.Conv3x3(6, kernel_init=nn.initializers.zeros)
  ours, ref, zero = jax.jit(lambda key: (conv.Conv3x3(6).init(key, x),
                                         nn.Conv(6, (3, 3)).init(key, x),
                                         zero_init.init(key, x)))(key)
  assert jax.tree.structure(ours) == jax.tree.structure(ref)
  assert ours['params']['kernel'].shape == (3, 3, 3, 6)
  assert ours['params']['bias'].shape == (6,)
  # Same initializers drawn in the same order: identical values.
  jax.tree.map(np.testing.assert_array_equal, ours, ref)
  _assert_float32(ours)
  assert not np.any(np.asarray(zero['params']['kernel']))


def test_module_matches_nn_conv_under_jit_and_grad():
  """Same params: outputs equal nn.Conv's, gradients equal across impls."""
  x, t = _normal(2, 2, 6, 5, 4), _normal(3, 2, 6, 5, 8)
  params = {'params': {'kernel': _normal(4, 3, 3, 4, 8), 'bias': _normal(5, 8)}}

  def loss(params, x, model):
    return jnp.sum(model.apply(params, x) * t)

  @jax.jit
  def run(params, x):
    ref = nn.Conv(8, (3, 3)).apply(params, x)
    outs, grads = {}, {}
    for impl in ('patches', 'xla', 'auto'):
      model = conv.Conv3x3(8, impl=impl)
      outs[impl] = model.apply(params, x)
      grads[impl] = jax.grad(loss, (0, 1))(params, x, model)
    grads_ref = jax.grad(loss, (0, 1))(params, x, nn.Conv(8, (3, 3)))
    return ref, outs, grads, grads_ref

  ref, outs, grads, grads_ref = run(params, x)
  for impl in outs:
    np.testing.assert_allclose(outs[impl], ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                         atol=1e-4),
                 grads[impl], grads_ref)


def test_module_bfloat16():
  x = _normal(6, 2, 6, 6, 8)
  params = {'params': {'kernel': 0.1 * _normal(7, 3, 3, 8, 4),
                       'bias': _normal(8, 4)}}

  @jax.jit
  def run(params, x):
    out = {}
    for impl in ('patches', 'xla'):
      model = conv.Conv3x3(4, dtype=jnp.bfloat16, impl=impl)
      loss = lambda p, m=model: jnp.sum(m.apply(p, x).astype(jnp.float32))
      out[impl] = model.apply(params, x), jax.grad(loss)(params)
    return out, conv.Conv3x3(4).apply(params, x)

  out, want = run(params, x)
  for y, grads in out.values():
    assert y.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: inputs, params and output each round
    # by <= 2^-9 relative (observed 4.5e-3 of max |output|).
    np.testing.assert_allclose(np.asarray(y, np.float32), want,
                               atol=0.02 * float(jnp.max(jnp.abs(want))))
    _assert_float32(grads)
