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

from vdm_jax.model.vdm import VDM
from vdm_jax.model.vdm import VDMOutput

__all__ = ['VDM', 'VDMOutput']
__version__ = '0.1.0'

# Modules importable by their short name, `from vdm_jax import evaluate`, loaded on use.
_SHORT_NAMES = {'evaluate': 'vdm_jax.evaluation.evaluate'}


def __getattr__(name):
  if name in _SHORT_NAMES:
    return importlib.import_module(_SHORT_NAMES[name])
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
