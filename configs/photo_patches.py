r"""Colour photographs as 16x16x3 patches (experiments/photo_patches.py), on 2 CPU cores.

  python experiments/photo_patches.py --photos=~/Pictures  # writes photo_patches.npz
  python -m vdm_jax.main --config=configs/photo_patches.py --workdir=workdirs/photos

Starts from configs/mnist.py (the same small U-Net, v-prediction and adaptive noise
levels, two steps per dispatch) and changes what colour patches and compression need:
- data.dataset = npz: the patches file, photo_patches.npz in the folder the command
  runs from (what the script writes by default; --config.data.npz_path=… for another).
- Three channels carry three times MNIST's values per pixel on a third of its pixels,
  so the network is twice as wide (n_embd 32) on the same three resolutions (16x16,
  8x8, 4x4).
- model.weighting = 'elbo': the patches are for compression, whose file length is the
  bound; MNIST's extra sigmoid weighting buys sample quality at the bound's expense.
- 4,000 steps of batch 16: 2.8–3.8 steps/s measured on the 2-core VM while other
  runs shared it (load ≈ 9), so about 20 minutes there.
Not tuned beyond that: the widths, batch and length were chosen for the budget, not
searched.
"""

from vdm_jax import config_base


def get_config():
  config = config_base.config_beside(__file__, 'mnist')
  config.data.dataset = 'npz'  # uint8 'train' and 'test' [N, 16, 16, 3] in data.npz_path
  config.data.npz_path = 'photo_patches.npz'  # experiments/photo_patches.py's default output
  config.model.n_embd = 32  # channels at 16x16; 64 at 8x8 and 4x4 (channel_mult (1, 2, 2))
  config.model.groupnorm_groups = 8  # GroupNorm groups of 4 channels at 16x16
  config.model.weighting = 'elbo'  # train on the bound itself: the file's length
  config.training.batch_size = 16  # patches per step
  config.training.num_steps = 4_000  # ~20 min on 2 shared CPU cores
  config.training.checkpoint_every = 1_000  # a checkpoint every ~5 min
  config.sample.num_samples = 64  # an 8x8 grid of sampled patches
  return config
