r"""The MNIST default with a learned schedule per sub-pixel, conditioned on the image (MuLAN).

  python -m vdm_jax.main --config=configs/mnist_mulan.py --workdir=workdirs/mnist_mulan

Everything else is configs/mnist.py (the same network, data order and steps), so that the
two runs compare paired, image by image (experiments/paired_runs.py). Each sub-pixel's γ
follows its own monotone polynomial in t between shared learned ends, its coefficients
computed from a discrete latent c that an encoder infers from the image; the bound pays
KL(q(c|x) ‖ p(c)) for it (docs/maths.md §13). The adaptive proposal draws t, not γ (§13.5).
"""

from vdm_jax import config_base


def get_config():
  config = config_base.config_beside(__file__, 'mnist')
  config.model.schedule = 'mulan'
  return config
