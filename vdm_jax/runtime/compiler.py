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
"""

import jax

# YNNPACK fusions kept on CPU: matmuls and reductions.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ','.join(
    f'LIBRARY_FUSION_TYPE_{kind}' for kind in ('DOT', 'REDUCE'))}


def compiler_options() -> dict:
  """Options for jax.jit(..., compiler_options=…) on the default backend."""
  return dict(_CPU_OPTIONS) if jax.default_backend() == 'cpu' else {}
