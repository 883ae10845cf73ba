r"""Downsampled ImageNet 64x64: the paper's 3.40 bpd model (docs/maths.md §8).

The 32x32 model (configs/imagenet32.py) on the 64x64 images, with 64 blocks. For the
training budget see experiments/recipes/imagenet64.md and the paper's appendix.

  python -m vdm_jax.main --config=configs/imagenet64.py --workdir=workdirs/imagenet64
"""

from vdm_jax import config_base


def get_config():
  config = config_base.config_beside(__file__, 'imagenet32')
  config.data.dataset = 'downsampled_imagenet64'
  config.model.n_layer = 64
  return config
