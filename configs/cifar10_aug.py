r"""CIFAR-10 with the original's augmentation and conditioning flag (docs/maths.md §8).

The released augmented model: n_embd 256, learned_nnet schedule with free endpoints,
dropout 0.05; the paper reports 2.49 bpd, the original README 2.522.

  python -m vdm_jax.main --config=configs/cifar10_aug.py --workdir=workdirs/cifar10_aug
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.augment = True
  # The released model's training run (the original code's config): batch 768, lr 1e-4.
  config.training.batch_size = 768
  config.optimizer.learning_rate = 1e-4
  config.model.n_embd = 256
  config.model.schedule = 'learned_nnet'
  config.model.schedule_endpoints = 'free'
  config.model.p_drop = 0.05
  return config
