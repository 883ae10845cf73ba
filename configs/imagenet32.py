r"""Downsampled ImageNet 32x32: the paper's 3.72 bpd model (docs/maths.md §8).

Needs the original downsampled ImageNet files placed for tfds' manual download
(docs/training.md, "Data"). n_embd 256 and 32 blocks. For the training budget (batch,
steps, devices) see experiments/recipes/imagenet32.md and the paper's appendix.

  python -m vdm_jax.main --config=configs/imagenet32.py --workdir=workdirs/imagenet32
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.dataset = 'downsampled_imagenet32'
  config.model.n_embd = 256
  config.model.n_layer = 32
  return config
