"""Drawing samples from a trained VDM, saving them as an image grid (docs/maths.md §7) and
scoring many of them (vdm_jax/evaluation/sample_quality.py, §12)."""

import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import build as build_lib
from vdm_jax.evaluation import feature_net
from vdm_jax.evaluation import sample_quality
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


def draw_samples(run: build_lib.Run, params: Any, num: int, batch_size: int,
                 key: jax.Array) -> np.ndarray:
  """`num` samples (config.sample's T and decoding) in calls of `batch_size`, call i
  with fold_in(key, i); the last call is drawn whole and cut."""
  sc = run.config.sample
  batch_size = min(batch_size, num)
  sampler = make_sampler(run.model, (batch_size,) + run.image_shape, sc.timesteps, sc.decode,
                         sc.conditioning, run.mesh)
  calls = [parallel.to_host(sampler(params, jax.random.fold_in(key, i)))
           for i in range(-(-num // batch_size))]
  return np.concatenate(calls)[:num]


def score_samples(run: build_lib.Run, params: Any, wd: workdir_lib.Workdir, step: int,
                  writer=None, features=None) -> dict:
  """Draws config.quality.num_samples samples and writes their numbers (§12) to
  sample_quality.json (and _<step>.json) and TensorBoard; returns them."""
  config = run.config
  q = config.quality
  start = time.time()
  key = jax.random.fold_in(jax.random.key(config.seed), 0x51A1)
  samples = draw_samples(run, params, q.num_samples, q.batch_size, key)
  seconds = time.time() - start
  results = sample_quality.evaluate_samples(samples, config, features)
  results.update(timesteps=config.sample.timesteps, decode=config.sample.decode,
                 use_ema=config.eval.use_ema, params=run.params_name,
                 seconds_sampling=round(seconds, 1))
  wd.write_results(results, step, sample_quality.RESULTS_FILE)
  if writer is not None and jax.process_index() == 0:
    writer.write_scalars(int(step), sample_quality.scalars(results))
  return dict(results, step=int(step))


def sample_workdir(config, workdir, mesh=None):
  """--mode=sample: a grid of samples from the newest checkpoint and, when
  config.quality.num_samples > 0, the numbers of that many; returns (PNG path, numbers
  or None)."""
  wd = workdir_lib.Workdir(workdir)
  run, state = build_lib.restore(config, wd, mesh)
  # Before any sampling: a bad cache folder fails fast, and a new network trains once.
  features = feature_net.load_or_train(config) if config.quality.num_samples else None
  writer = wd.metric_writer(just_logging=jax.process_index() > 0)
  params, step = run.eval_params(state), int(state.step)
  try:
    _, path = sample_and_save(run, params, wd, step, writer)
    results = (score_samples(run, params, wd, step, writer, features)
               if features is not None else None)
  finally:
    writer.flush()
  return path, results
