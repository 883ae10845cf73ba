"""The CPU compiler options change the schedule of the arithmetic, not its result; the
persistent compilation cache's folder."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import errors
from vdm_jax.runtime import compiler


def test_options_keep_conv_values_and_gradients_to_float_rounding():
  # The paper network's block size (32 channels at 28×28, batch 8): large enough that
  # XLA:CPU would hand the convolutions to YNNPACK without the options.
  kx, kk, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (8, 28, 28, 32))
  k = jax.random.normal(kk, (3, 3, 32, 32)) / jnp.sqrt(9 * 32.0)
  g = jax.random.normal(kg, (8, 28, 28, 32))

  def value_and_grads(x, k):
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y, vjp = jax.vjp(conv, x, k)
    return (y,) + vjp(g)

  with_options = jax.jit(value_and_grads, compiler_options=compiler.compiler_options())
  without = jax.jit(value_and_grads)
  for a, b in zip(with_options(x, k), without(x, k)):
    # Sums of 288 (forward, input gradient) or 8·28·28 = 6,272 (kernel gradient)
    # products of O(1) terms in float32: agreement to ~1e-5 of the largest entry.
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0)


def test_options_only_on_cpu():
  options = compiler.compiler_options()
  assert (options != {}) == (jax.default_backend() == 'cpu')


def test_cache_dir_follows_the_flag_then_the_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'env'))
  assert compiler.cache_dir(str(tmp_path / 'flag')) == str(tmp_path / 'flag')
  assert compiler.cache_dir('') is None
  assert compiler.cache_dir(None) == str(tmp_path / 'env')
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR')
  assert compiler.cache_dir(None).endswith(os.path.join('vdm_jax', 'jax'))


def test_cache_folder_that_cannot_be_made_is_an_input_error(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(errors.InputError, match='--compilation_cache'):
    compiler.use_persistent_cache(str(blocker / 'cache'))
