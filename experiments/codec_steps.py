r"""The T-step bound with equal steps in t and with steps placed for rate (§9.1).

  python experiments/codec_steps.py --config=configs/mnist.py --workdir=workdirs/mnist \
      --num_images=100 --timesteps=50,100,200,400

On the first --num_images evaluation images (config.eval.split), estimates the step
density √w on vdm_jax/codec/steps.py's K bins from those images (as a file's encoder
does), then for each T the T-step bound in bits per dimension (every T term drawn once
per image, tools.discrete_bound) with γ(i/T) and with the placed levels, on the same
draws of ε, and their difference paired per image ± its standard error. Prints a
Markdown table; --output writes the rows and the density as JSON.
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from vdm_jax.codec import steps
from vdm_jax.codec import tables
from vdm_jax.codec import tools as codec_tools
from vdm_jax.data import datasets
from vdm_jax.runtime import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position


def compare(model, params, images, timesteps_list, batch_size=64, seed=0) -> dict:
  """{'density': K bytes, 'rows': one per T} for these images."""
  vocab = int(model.config.vocab_size)
  dims = math.prod(images.shape[1:])
  ends = tables.gamma_grid(model, params, 1)
  start = time.perf_counter()
  density = steps.estimate_density(model, params, images, vocab, ends[0], ends[1],
                                   batch_size=batch_size)
  density_seconds = time.perf_counter() - start
  rows = []
  for t in timesteps_list:
    placed = steps.placed_gamma(ends[0], ends[1], density, t)
    uniform = codec_tools.discrete_bound(model, params, images, t, batch_size=batch_size,
                                         seed=seed) / dims
    rate = codec_tools.discrete_bound(model, params, images, t, batch_size=batch_size,
                                      seed=seed, gamma=placed) / dims
    diff = rate - uniform
    rows.append(dict(timesteps=t, uniform_bpd=float(uniform.mean()),
                     placed_bpd=float(rate.mean()), placed_minus_uniform=float(diff.mean()),
                     stderr=float(diff.std(ddof=1) / math.sqrt(len(diff)))
                     if len(diff) > 1 else math.nan))
  return dict(num_images=len(images), gamma_ends=[float(e) for e in ends],
              density_seconds=density_seconds,
              density=list(density), rows=rows)


def markdown(results: dict) -> str:
  lines = [f"{results['num_images']} images; steps placed with density ∝ √w on "
           f"{len(results['density'])} bins of γ in [{results['gamma_ends'][0]:.2f}, "
           f"{results['gamma_ends'][1]:.2f}]:", '',
           '| T | equal steps in t (bpd) | placed for rate (bpd) | placed − equal |',
           '|---|---|---|---|']
  for r in results['rows']:
    lines.append(f"| {r['timesteps']} | {r['uniform_bpd']:.4f} | {r['placed_bpd']:.4f} | "
                 f"{r['placed_minus_uniform']:+.4f} ± {r['stderr']:.4f} |")
  return '\n'.join(lines) + '\n'


def run(config, workdir: str, num_images: int, timesteps_list: list, output=None):
  """Restores the workdir's model and prints (and writes) the table."""
  host_memory.keep_freed_memory()
  images = np.asarray(datasets.load_split(config.data, config.eval.split))[:num_images]
  model, params, _ = codec_tools.restore(config, workdir)
  results = compare(model, params, images, timesteps_list, config.codec.batch_size)
  print(markdown(results), end='')
  if output:
    with open(output, 'w') as out:
      json.dump(results, out, indent=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  run(f.config, f.workdir, f.num_images, [int(t) for t in f.timesteps], f.output)


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  flags.DEFINE_string('workdir', None, 'The trained model\'s workdir.')
  flags.DEFINE_integer('num_images', 100, 'First N evaluation images.')
  flags.DEFINE_list('timesteps', ['50', '100', '200', '400'], 'T values.')
  flags.DEFINE_string('output', None, 'JSON file for the results.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  _define_flags()
  app.run(main)
