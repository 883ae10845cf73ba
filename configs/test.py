r"""A tiny model on sklearn's digits, for tests: compiles and steps in seconds.

  python -m vdm_jax.main --config=configs/test.py --workdir=/tmp/vdm_test
"""

from vdm_jax import config_base


def get_config():
  config = config_base.config_beside(__file__, 'digits')
  config.model.n_embd = 8
  config.model.n_layer = 1
  config.model.groupnorm_groups = 4
  config.optimizer.warmup_steps = 2
  config.optimizer.ema_rate = 0.99
  config.training.batch_size = 8
  config.training.num_steps = 6
  config.training.steps_per_call = 2
  config.training.log_every = 2
  config.training.checkpoint_every = 2
  config.eval.batch_size = 64
  config.eval.num_examples = 100
  config.sample.num_samples = 4
  config.sample.timesteps = 5
  config.quality.num_samples = 0  # no feature network in the tests that sample
  return config
