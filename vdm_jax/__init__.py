"""vdm_jax: Variational Diffusion Models in JAX/Flax (Kingma et al., 2021).

    model/       schedules, the noise-prediction network, the VDM and its bound
    data/        data sets and the input pipeline
    training/    train state, optimiser, training loop
    evaluation/  the bound over a split, the probability-flow ODE, samples
    codec/       lossless compression by bits-back coding
    runtime/     devices, compiler options, host memory, workdir, lock, checkpoints
    build.py     a run from its config; validation.py checks the config first
    main.py      the command line (reporting.py: how its faults reach the user)
"""

import importlib

__all__ = ['VDM', 'VDMOutput']
__version__ = '0.1.0'

# Names of the package, each loaded on first use, so that importing a light module
# (vdm_jax.errors, vdm_jax.runtime.signals: the command line's first lines) loads no JAX.
# `from vdm_jax import evaluate` is the module vdm_jax.evaluation.evaluate.
_LAZY = {'VDM': ('vdm_jax.model.vdm', 'VDM'), 'VDMOutput': ('vdm_jax.model.vdm', 'VDMOutput'),
         'evaluate': ('vdm_jax.evaluation.evaluate', None)}


def __getattr__(name):
  if name in _LAZY:
    module, attribute = _LAZY[name]
    module = importlib.import_module(module)
    return module if attribute is None else getattr(module, attribute)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
