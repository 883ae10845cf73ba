r"""Downsampled ImageNet 32x32: the paper's 3.72 bpd model (SPEC §8).

Needs the original downsampled ImageNet files placed for tfds' manual download
(README, "Data"). n_embd 256, 32 blocks, no dropout, batch 512 in the paper's setup.

  python -m vdm_jax.main --config=configs/imagenet32.py --workdir=workdirs/imagenet32
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.dataset = 'downsampled_imagenet32'
  config.model.n_embd = 256
  config.model.n_layer = 32
  config.model.p_drop = 0.0
  config.training.batch_size = 512
  return config
