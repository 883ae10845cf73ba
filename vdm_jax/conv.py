"""3x3 SAME stride-1 convolutions, with a matmul ('patches') formulation.

The network (SPEC §6) is built from 3x3 convolutions that keep the resolution.
Two implementations compute the same function:

* 'xla': `jax.lax.conv_general_dilated`, differentiated by JAX.
* 'patches': im2col. The input is padded by one pixel and its nine shifted
  views are concatenated along channels into patches [B, H, W, 9*Cin] (order
  dy, dx, cin, which is the row order of the HWIO kernel reshaped to
  [9*Cin, Cout]), so the forward pass is one matmul. A `jax.custom_vjp` makes
  the backward pass matmuls too: the kernel gradient is patches^T @ grad_out
  and the input gradient is the same im2col convolution of grad_out with the
  spatially flipped, in/out-transposed kernel (exact for SAME 3x3: pad 1 on
  both sides). The patches are recomputed in the backward pass rather than
  saved, so memory stays at one 9x buffer per convolution at a time.

Measured with experiments/conv_microbench.py (jax 0.10.2, 2-core AMD EPYC,
interleaved with a 2048^2 float32 matmul): XLA CPU compiles these convolutions,
and the ones autodiff derives, to YNNPACK fusions, whose forward runs at
~0.5-1x and forward+backward at ~0.7-1.4x the matmul's rate measured alongside
(Cin >= 32; the 5-channel input conv is slower but tiny). 'patches' pushes the
9x buffer through memory (XLA's concatenate runs at ~1-8 GB/s here) and is
1.6-8x slower in forward and forward+backward, in float32 and bfloat16; in a
stand-in of the MNIST U-Net's train step it was ~1.5x slower. Hence 'auto' is
'xla' on every backend; 'patches' stays as an exact, tested alternative.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ('xla', 'patches', 'auto')


def resolve_impl(impl: str) -> str:
  """Returns 'xla' or 'patches'; 'auto' is 'xla' (fastest measured, above)."""
  if impl == 'auto':
    return 'xla'
  if impl in ('xla', 'patches'):
    return impl
  raise ValueError(f'conv impl must be one of {IMPLS}, got {impl!r}')


def _conv_xla(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _patches(x):
  """[B, H, W, C] -> [B*H*W, 9*C], columns ordered (dy, dx, c)."""
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  views = [xp[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)]
  return jnp.concatenate(views, axis=-1).reshape(b * h * w, 9 * c)


def _matmul(a, b, dtype):
  """a @ b accumulated in float32, returned in `dtype`."""
  return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype)


def _conv_im2col(x, kernel):
  b, h, w, c = x.shape
  y = _matmul(_patches(x), kernel.reshape(9 * c, -1), x.dtype)
  return y.reshape(b, h, w, -1)


@jax.custom_vjp
def _conv_patches(x, kernel):
  return _conv_im2col(x, kernel)


def _conv_patches_fwd(x, kernel):
  return _conv_im2col(x, kernel), (x, kernel)


def _conv_patches_bwd(res, g):
  x, kernel = res
  b, h, w, c = x.shape
  g2 = g.reshape(b * h * w, -1)
  # d kernel[dy, dx, i, o] = sum_p x[p + (dy, dx) - 1, i] g[p, o].
  dkernel = _matmul(_patches(x).T, g2, kernel.dtype).reshape(kernel.shape)
  # d x[p, i] = sum_{dy, dx, o} g[p - (dy, dx) + 1, o] kernel[dy, dx, i, o]: a
  # SAME conv of g with kernel[2 - dy, 2 - dx, o, i].
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  dx = _conv_im2col(g, flipped)
  return dx, dkernel


_conv_patches.defvjp(_conv_patches_fwd, _conv_patches_bwd)


def conv3x3(x, kernel, impl: str = 'auto'):
  """3x3 SAME stride-1 convolution without bias.

  Args:
    x: [B, H, W, Cin].
    kernel: [3, 3, Cin, Cout] (HWIO); cast to x's dtype.
    impl: 'xla', 'patches' or 'auto' (see `resolve_impl`).

  Returns:
    [B, H, W, Cout] in x's dtype.
  """
  if x.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.ndim != 4:
    raise ValueError(f'expected x [B,H,W,C] and kernel [3,3,Cin,Cout], got '
                     f'{x.shape} and {kernel.shape}')
  if kernel.shape[2] != x.shape[-1]:
    raise ValueError(f'kernel Cin {kernel.shape[2]} != input channels '
                     f'{x.shape[-1]}')
  kernel = kernel.astype(x.dtype)
  if resolve_impl(impl) == 'xla':
    return _conv_xla(x, kernel)
  return _conv_patches(x, kernel)


class Conv3x3(nn.Module):
  """Drop-in for nn.Conv(features, (3, 3)): same param names, shapes, inits.

  Attributes:
    features: output channels.
    kernel_init: initializer of 'kernel' [3, 3, Cin, features].
    bias_init: initializer of 'bias' [features].
    dtype: compute dtype (None: promote input and params, as nn.Conv does);
      params are always float32.
    impl: 'xla', 'patches' or 'auto' (see `resolve_impl`).
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv3x3(x, kernel, self.impl) + bias
