"""XLA compiler options for the model's computations (train step, evaluation, sampler).

On CPU, XLA hands convolutions, matmuls, elementwise and reduction fusions to the
YNNPACK library by default. Its 3×3 convolution's kernel gradient is slow at the
paper's sizes: on the 2-core development machine (jax 0.10.2) it took 44 % of the
train step of the 32-channel network at 28×28, batch 32, about 3× the time of the
forward convolution, while XLA's own convolution kernels compute the same gradient in
about a third of that. The option below keeps YNNPACK for everything but the
convolutions. It changes how the arithmetic is scheduled, not what is computed:
results agree to float32 rounding. Other backends get no options.
"""

import jax

# YNNPACK fusions kept on CPU: all of its kinds except the convolution.
_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ','.join(
    f'LIBRARY_FUSION_TYPE_{kind}' for kind in ('DOT', 'ELTWISE', 'REDUCE'))}


def compiler_options() -> dict:
  """Options for jax.jit(..., compiler_options=…) on the default backend."""
  return dict(_CPU_OPTIONS) if jax.default_backend() == 'cpu' else {}
