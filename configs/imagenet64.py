r"""Downsampled ImageNet 64x64: the paper's 3.40 bpd model (docs/maths.md §8).

Needs the original downsampled ImageNet files placed for tfds' manual download
(README, "Data"). n_embd 256 and 64 blocks. For the training budget see
experiments/recipes/imagenet64.md and the paper's appendix.

  python -m vdm_jax.main --config=configs/imagenet64.py --workdir=workdirs/imagenet64
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.dataset = 'downsampled_imagenet64'
  config.model.n_embd = 256
  config.model.n_layer = 64
  return config
