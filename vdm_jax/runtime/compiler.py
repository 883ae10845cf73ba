"""XLA compiler options for the model's computations (train step, evaluation, sampler).

On CPU, XLA hands convolutions, matmuls, elementwise and reduction fusions to the
YNNPACK library by default. Two of those kinds are slow for this model, and the
options keep YNNPACK for matmuls and reductions only:

- Convolutions: YNNPACK's 3×3 kernel gradient took 44 % of the train step of the
  paper's 32-channel network at 28×28, batch 32 on the 2-core development machine
  (jax 0.10.2), about 3× the forward convolution's time; XLA's own kernels compute it
  in about a third of that.
- Elementwise fusions: YNNPACK's elementwise kernels are separate library calls, so
  every chain of them writes its result to memory where XLA would fuse the chain into
  its consumer. The decoder's normaliser (vdm.decoder_log_normaliser) then stores four
  [..., V] arrays instead of none (tests/test_compiler.py), and GroupNorm, swish and
  dropout each make extra passes over the activations. Without them the paper
  network's train step ran 1.2–1.6× faster (alternating processes, BENCHMARKS.md).

They change how the arithmetic is scheduled, not what is computed: results agree to
float32 rounding. Other backends get no options.

The command line also keeps JAX's persistent compilation cache (`use_persistent_cache`),
so that a second run of the same computations loads them instead of compiling.
"""

import os
from typing import Optional

import jax
import platformdirs

from vdm_jax import errors

# YNNPACK fusions kept on CPU: matmuls and reductions.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ','.join(
    f'LIBRARY_FUSION_TYPE_{kind}' for kind in ('DOT', 'REDUCE'))}


def compiler_options() -> dict:
  """Options for jax.jit(..., compiler_options=…) on the default backend."""
  return dict(_CPU_OPTIONS) if jax.default_backend() == 'cpu' else {}


def cache_dir(flag: Optional[str]) -> Optional[str]:
  """The persistent cache's folder for the --compilation_cache flag: the flag's value
  ('' for none); unset, $JAX_COMPILATION_CACHE_DIR or the user's cache folder."""
  if flag is not None:
    return flag or None
  return (os.environ.get('JAX_COMPILATION_CACHE_DIR')
          or os.path.join(platformdirs.user_cache_dir('vdm_jax'), 'jax'))


def use_persistent_cache(directory: Optional[str]) -> None:
  """Keeps compiled computations in `directory` (None: off). JAX keys each entry by
  the computation, the compiler options, the versions and the device."""
  if not directory:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise errors.InputError(
        f'--compilation_cache={directory}: cannot create the folder ({e}); name '
        'another one, or pass --compilation_cache= to compile without a cache.') from e
  jax.config.update('jax_compilation_cache_dir', directory)
  # The codec's network calls compile in well under JAX's default threshold of 1 s
  # each, but there are two per batch bucket: keep them all.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
