"""Drawing samples from a trained VDM and saving them as an image grid (docs/maths.md §7)."""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import build as build_lib
from vdm_jax.model import vdm
from vdm_jax.runtime import compiler
from vdm_jax.runtime import parallel
from vdm_jax.runtime import workdir as workdir_lib


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


def sample_and_save(run: build_lib.Run, params: Any, wd: workdir_lib.Workdir, step: int,
                    writer=None, key: Optional[jax.Array] = None) -> tuple[np.ndarray, Any]:
  """Draws config.sample.num_samples samples and writes samples_<step>.png (+ TensorBoard)."""
  config = run.config
  sc = config.sample
  shape = (sc.num_samples,) + run.image_shape
  sampler = make_sampler(run.model, shape, sc.timesteps, sc.decode, sc.conditioning,
                         run.mesh)
  if key is None:
    key = jax.random.fold_in(jax.random.key(config.seed), 0x5A3F1E)
  samples = parallel.to_host(sampler(params, key))
  grid = make_grid(to_uint8(samples, config.model.vocab_size))
  path = wd.write_png(wd.samples_path(step), grid, scale=max(1, 256 // max(grid.shape[:2])))
  if writer is not None and jax.process_index() == 0:
    writer.write_images(int(step), {'samples': grid[None]})
  return samples, path


def sample_workdir(config, workdir, mesh=None):
  """--mode=sample: a grid of samples from the newest checkpoint; returns the PNG path."""
  wd = workdir_lib.Workdir(workdir)
  run, state = build_lib.restore(config, wd, mesh)
  writer = wd.metric_writer(just_logging=jax.process_index() > 0)
  try:
    _, path = sample_and_save(run, run.eval_params(state), wd, int(state.step), writer)
  finally:
    writer.flush()
  return path
