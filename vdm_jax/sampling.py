"""Drawing samples from a trained VDM and saving them as an image grid (§7)."""

import math
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from vdm_jax import compiler
from vdm_jax import parallel
from vdm_jax import vdm


def make_sampler(model: vdm.VDM, shape, timesteps: int, decode: str = 'argmax',
                 conditioning: float = 0.0, mesh=None):
  """jit(params, key) → int32 samples [N, H, W, C], the whole T-step loop compiled once.

  With a mesh whose device count divides N, the samples are sharded over 'data'.
  """
  cond = jnp.full((shape[0],), conditioning, jnp.float32)

  def sample(params, key):
    return model.apply({'params': params}, key, tuple(shape), cond, timesteps=timesteps,
                       decode=decode, method=vdm.VDM.sample)

  if mesh is None:
    return jax.jit(sample, compiler_options=compiler.compiler_options())
  out = (parallel.batch_sharding(mesh) if shape[0] % mesh.devices.size == 0
         else parallel.replicated(mesh))
  return jax.jit(sample, in_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 out_shardings=out, compiler_options=compiler.compiler_options())


def to_uint8(samples: np.ndarray, vocab_size: int) -> np.ndarray:
  """Integers in [0, V) → 0..255 for display."""
  return np.round(np.asarray(samples, np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)


def make_grid(images: np.ndarray, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] uint8 → one [rows·(H+pad), cols·(W+pad), C] image, nearly square."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return grid


def save_png(grid: np.ndarray, path: str, scale: int = 1) -> str:
  img = grid[..., 0] if grid.shape[-1] == 1 else grid
  image = Image.fromarray(img)
  if scale > 1:
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
  tmp = path + '.tmp.png'
  image.save(tmp)
  os.replace(tmp, path)
  return path


def sample_and_save(model: vdm.VDM, params: Any, config, image_shape, workdir: str,
                    step: int, mesh=None, writer=None, key: Optional[jax.Array] = None
                    ) -> tuple[np.ndarray, str]:
  """Draws config.sample.num_samples samples and writes samples_<step>.png (+ TensorBoard)."""
  sc = config.sample
  shape = (sc.num_samples,) + tuple(image_shape)
  sampler = make_sampler(model, shape, sc.timesteps, sc.decode, sc.conditioning, mesh)
  if key is None:
    key = jax.random.fold_in(jax.random.key(config.seed), 0x5A3F1E)
  samples = parallel.to_host(sampler(params, key))
  images = to_uint8(samples, config.model.vocab_size)
  grid = make_grid(images)
  path = os.path.join(workdir, f'samples_{int(step)}.png')
  if jax.process_index() == 0:
    save_png(grid, path, scale=max(1, 256 // max(grid.shape[:2])))
    if writer is not None:
      writer.write_images(int(step), {'samples': grid[None]})
  return samples, path
