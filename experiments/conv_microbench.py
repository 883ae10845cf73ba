r"""Microbenchmark of 3x3 SAME convolution formulations on the local backend.

For each shape (B, H, W, Cin, Cout) it times, under jit, the forward pass and
the forward+backward pass (jax.grad of <conv(x, k), ct> w.r.t. x and k) of:

  xla         jax.lax.conv_general_dilated, JAX autodiff.
  patches     vdm_jax.conv 'patches': im2col matmul, custom_vjp with matmul
              kernel gradient and im2col input gradient.
  im2col_ad   im2col matmul differentiated by JAX (col2im input gradient).
  shifted     sum of 9 shifted-view matmuls, differentiated by JAX.
  xla+pbwd    xla forward, the 'patches' backward.

GFLOP/s count 2*B*H*W*9*Cin*Cout per forward and 3x that per forward+backward.
The machine's throughput drifts (other processes share the cores), so every
round times every candidate once, plus a 2048x2048 float32 matmul as the
reference, and the table reports medians over rounds.

  python experiments/conv_microbench.py [--rounds 9] [--dtype bfloat16]
      [--mallopt]   # glibc: keep freed memory (no mmap/munmap per buffer)
      [--unet]      # instead: the MNIST config's score-network gradient
"""

import argparse
import ctypes
import os
import sys
import time

# Import from the repo root, not this folder (whose modules could shadow the
# standard library's, e.g. a compression.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or '.') != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))


def _parse():
  p = argparse.ArgumentParser()
  p.add_argument('--rounds', type=int, default=9)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--mallopt', action='store_true')
  p.add_argument('--only', default='', help='comma-separated candidate names')
  p.add_argument('--unet', action='store_true',
                 help='time value_and_grad of the MNIST config score network '
                 '(batch 32, dropout on) per conv impl instead')
  return p.parse_args()


ARGS = _parse()
if ARGS.mallopt:  # Before JAX allocates anything.
  _libc = ctypes.CDLL('libc.so.6')
  _libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
  _libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from vdm_jax import conv  # pylint: disable=g-import-not-at-top

SHAPES = [(32, 28, 28, 32, 32), (32, 28, 28, 64, 32), (32, 28, 28, 5, 32),
          (16, 32, 32, 128, 128)]


def _shifted(x, k):
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(jnp.einsum('bhwc,co->bhwo', xp[:, dy:dy + h, dx:dx + w], k[dy, dx])
             for dy in range(3) for dx in range(3))


@jax.custom_vjp
def _xla_fwd_patches_bwd(x, k):
  return conv._conv_xla(x, k)  # pylint: disable=protected-access


# pylint: disable=protected-access
_xla_fwd_patches_bwd.defvjp(lambda x, k: (conv._conv_xla(x, k), (x, k)),
                            conv._conv_patches_bwd)
# pylint: enable=protected-access

CANDIDATES = {
    'xla': lambda x, k: conv.conv3x3(x, k, 'xla'),
    'patches': lambda x, k: conv.conv3x3(x, k, 'patches'),
    'im2col_ad': conv._conv_im2col,  # pylint: disable=protected-access
    'shifted': _shifted,
    'xla+pbwd': _xla_fwd_patches_bwd,
}


def main():
  dtype = jnp.dtype(ARGS.dtype)
  names = ARGS.only.split(',') if ARGS.only else list(CANDIDATES)
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (2048, 2048), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s), '
        f'dtype {dtype.name}, rounds {ARGS.rounds}, mallopt {ARGS.mallopt}, '
        f'load average {os.getloadavg()[0]:.1f}')
  header = f'{"shape (B,H,W,Cin,Cout)":24s} {"matmul":>7s}'
  for n in names:
    header += f' | {n + " fwd":>13s} {n + " f+b":>13s}'
  print(header)
  for shape in SHAPES:
    b, h, w, cin, cout = shape
    kx, kk, kc = jax.random.split(jax.random.fold_in(key, cin), 3)
    x = jax.random.normal(kx, (b, h, w, cin), dtype)
    k = (jax.random.normal(kk, (3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(
        dtype)
    ct = jax.random.normal(kc, (b, h, w, cout), dtype)
    flops = 2 * b * h * w * 9 * cin * cout
    fns = {'matmul': (matmul, (a,), 2 * 2048**3)}
    ref = conv.conv3x3(x, k, 'xla').astype(jnp.float32)
    for n in names:
      f = CANDIDATES[n]
      fwd = jax.jit(f)
      err = float(jnp.max(jnp.abs(fwd(x, k).astype(jnp.float32) - ref)))
      assert err <= 1e-2 * float(jnp.max(jnp.abs(ref))), (n, err)
      loss = lambda x, k, f=f: jnp.sum((f(x, k) * ct).astype(jnp.float32))
      fns[n + ' fwd'] = (fwd, (x, k), flops)
      fns[n + ' f+b'] = (jax.jit(jax.grad(loss, (0, 1))), (x, k), 3 * flops)
    times = {n: [] for n in fns}
    for f, args, _ in fns.values():
      jax.block_until_ready(f(*args))  # Compile and warm up.
    for _ in range(ARGS.rounds):
      for n, (f, args, _) in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times[n].append(time.perf_counter() - t)
    rate = {n: fl / np.median(times[n]) / 1e9 for n, (_, _, fl) in fns.items()}
    line = f'{str(shape):24s} {rate["matmul"]:7.0f}'
    for n in names:
      line += f' | {rate[n + " fwd"]:13.0f} {rate[n + " f+b"]:13.0f}'
    print(line, flush=True)
  print(f'load average at the end {os.getloadavg()[0]:.1f} (other processes '
        'share the cores; compare columns within a row)')


def _time_rounds(fns, rounds):
  """{name: (f, args)} -> {name: median seconds}, one call of each per round."""
  for f, args in fns.values():
    jax.block_until_ready(f(*args))  # Compile and warm up.
  times = {n: [] for n in fns}
  for _ in range(rounds):
    for n, (f, args) in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[n].append(time.perf_counter() - t)
  return {n: float(np.median(v)) for n, v in times.items()}


def unet_main():
  """value_and_grad of the MNIST score network, 'xla' vs 'patches' convs."""
  from configs import mnist  # pylint: disable=g-import-not-at-top
  from vdm_jax import networks  # pylint: disable=g-import-not-at-top
  cfg = mnist.get_config()
  cfg.model.dtype = ARGS.dtype
  key = jax.random.PRNGKey(0)
  b = cfg.training.batch_size
  z = jax.random.normal(key, (b, 28, 28, 1))
  gamma = jnp.linspace(-13.3, 5.0, b)
  cond = jnp.zeros((b,))
  a = jax.random.normal(key, (2048, 2048), jnp.float32)
  fns = {'matmul': (jax.jit(lambda a: a @ a), (a,))}
  flops = {'matmul': 2 * 2048**3}
  for impl in ('xla', 'patches'):
    cfg.model.conv_impl = impl
    net = networks.make_score_model(cfg.model)
    params = net.init(key, z, gamma, cond)

    def loss(params, z, net=net):
      eps = net.apply(params, z, gamma, cond, deterministic=False,
                      rngs={'dropout': key})
      return jnp.mean(jnp.square(eps - z))

    step = jax.jit(jax.value_and_grad(loss))
    flops[impl] = step.lower(params, z).compile().cost_analysis()['flops']
    fns[impl] = (step, (params, z))
  med = _time_rounds(fns, ARGS.rounds)
  model_flops = flops['xla']  # XLA's count of the model (im2col adds copies).
  mm = flops['matmul'] / med['matmul'] / 1e9
  print(f'MNIST score net, batch {b}, dtype {ARGS.dtype}: '
        f'{model_flops / 1e9:.1f} GFLOP per value_and_grad (XLA count); '
        f'matmul {mm:.0f} GFLOP/s; load average {os.getloadavg()[0]:.1f}')
  for impl in ('xla', 'patches'):
    rate = model_flops / med[impl] / 1e9
    print(f'  {impl:8s} {med[impl]:.3f} s  {rate:5.1f} GFLOP/s  '
          f'{100 * rate / mm:3.0f}% of matmul')


if __name__ == '__main__':
  if ARGS.unet:
    unet_main()
  else:
    main()
