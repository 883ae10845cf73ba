r"""sklearn's 8x8 digits (17 grey levels, V = 17): a seconds-long real-data model.

  python -m vdm_jax.main --config=configs/digits.py --workdir=workdirs/digits
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.dataset = 'digits'
  config.model.vocab_size = 17
  config.model.n_embd = 32
  config.model.n_layer = 2
  config.model.groupnorm_groups = 8
  config.model.fourier_n_min = 3
  config.model.fourier_n_max = 4
  config.optimizer.learning_rate = 1e-3
  config.optimizer.ema_rate = 0.999
  config.training.batch_size = 64
  config.training.num_steps = 2000
  config.training.steps_per_call = 10
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.phema.snapshot_every = 100  # 20 snapshots of the EMA profiles, 2 x 0.9 MB each
  config.training.eval_every = 0
  config.training.sample_every = 0
  config.eval.batch_size = 128
  config.sample.num_samples = 64
  config.sample.timesteps = 100
  return config
