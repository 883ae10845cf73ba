"""vdm_jax: Variational Diffusion Models in JAX/Flax (Kingma et al., 2021)."""

from vdm_jax.vdm import VDM
from vdm_jax.vdm import VDMOutput

__all__ = ['VDM', 'VDMOutput']
__version__ = '0.1.0'
