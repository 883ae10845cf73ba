r"""CIFAR-10 without augmentation: the paper's 2.65 bpd model (docs/maths.md §8).

  python -m vdm_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10
"""

from vdm_jax import config_base


def get_config():
  return config_base.get_config()  # The base *is* this model.
