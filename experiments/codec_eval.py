r"""A model's bits-back files against its discrete-time bound, on its test images.

  python experiments/codec_eval.py --config=configs/mnist.py --workdir=workdirs/mnist

Compresses the evaluation images (config.eval.split, the first config.eval.num_examples
or --num_images of them) into one bits-back file with the workdir's model, every image
bits-back coded from pseudo-random initial bits (vdm_jax/codec/compressor.py with
conventional_images=0; T = config.codec.timesteps unless --timesteps, the steps placed
as config.codec.step_placement says), decodes it and
checks every image, and
estimates the discrete-time bound at the same T on the same images with every one of
the T diffusion terms drawn per image (--bound_draws times, averaged). Reports:

  file bpd      the whole file (header, initial bits and net stream) over N·D
  net bpd       final stream minus the seed: what the images cost once the initial
                bits are paid (they amortise over longer files)
  initial bits  seed bits the first pops consumed
  file − bound  per image: the image's information content under the coded models
                (pushes minus pops, which the stream matches to within the coder's
                overhead, reported) minus its bound; mean ± standard error
  time          encode and decode, network and entropy coding separately

Writes WORKDIR/codec_eval.json, then prints the comparison table of
experiments/codec_compare.py (JPEG XL at effort 9, WebP lossless and PNG, each the
better of per image and all images as one picture; the bound; this file's row).
"""

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

import codec_compare
from vdm_jax import codec
from vdm_jax.codec import tables
from vdm_jax.codec import tools as codec_tools
from vdm_jax.data import datasets
from vdm_jax.runtime import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position

RESULTS_FILE = 'codec_eval.json'


def evaluate(config, workdir: str, timesteps: int, num_images=None,
             bound_draws: int = 1) -> dict:
  """Compress, decompress and compare with the bound; JSON-ready results."""
  images = datasets.load_split(config.data, config.eval.split)
  num = num_images or config.eval.num_examples
  images = np.asarray(images[:num] if num else images)
  model, params, step = codec_tools.restore(config, workdir)
  c = config.codec
  data, report = codec.compress(
      model, params, images, timesteps=timesteps, batch_size=c.batch_size,
      first_group=c.first_group, resolution=c.resolution,
      first_resolution=c.first_resolution, first_images=c.first_images,
      support=c.support, step=step, conventional_images=0, fallback=False,
      step_placement=c.step_placement, ideal_bits=True)
  density = codec.read_header(data).step_density  # () unless placed for rate
  timings = {}
  decoded = codec.decompress(model, params, data, timings=timings)
  if not np.array_equal(decoded, images):
    raise AssertionError('The file did not decode to the original images.')
  start = time.perf_counter()
  levels = tables.gamma_grid(model, params, timesteps, density)
  bound = np.mean([codec_tools.discrete_bound(model, params, images, timesteps,
                                              batch_size=c.batch_size, seed=k,
                                              gamma=levels)
                   for k in range(bound_draws)], axis=0)
  bound_seconds = time.perf_counter() - start
  n, dims = len(images), report.dims_per_image
  overhead = report.net_bits - report.ideal_bits.sum()  # coder's, over the whole file
  diff = (report.ideal_bits + overhead / n - bound) / dims
  bound_bpd = float(bound.mean() / dims)
  return dict(
      dataset=config.data.dataset, split=config.eval.split, num_images=n,
      image_shape=list(images.shape[1:]), timesteps=timesteps,
      step_placement=c.step_placement,
      resolution=c.resolution, first_resolution=c.first_resolution,
      first_images=c.first_images,
      support=c.support, batch_size=c.batch_size,
      file_bytes=len(data), file_bpd=report.file_bpd, net_bpd=report.net_bpd,
      initial_bits=report.initial_bits, initial_bpd=report.initial_bpd,
      header_bytes=report.header_bits // 8, coder_overhead_bits=float(overhead),
      bound_bpd=bound_bpd, bound_bpd_stderr=float(bound.std(ddof=1) / dims / math.sqrt(n)),
      bound_draws=bound_draws,
      net_minus_bound_bpd=float(diff.mean()),
      net_minus_bound_stderr=float(diff.std(ddof=1) / math.sqrt(n)),
      net_minus_bound_percent=float(100 * diff.mean() / bound_bpd),
      initial_percent_of_net=float(100 * report.initial_bits / report.net_bits),
      groups=len(report.group_sizes),
      encode_seconds=report.seconds_total, encode_network_seconds=report.seconds_network,
      encode_coding_seconds=report.seconds_coding,
      decode_seconds=timings['seconds_total'],
      decode_network_seconds=timings['seconds_network'],
      decode_coding_seconds=timings['seconds_coding'], bound_seconds=bound_seconds)


def summary(r: dict) -> str:
  return '\n'.join([
      f"{r['num_images']} images of {r['dataset']} '{r['split']}', T = {r['timesteps']}, "
      f"resolution {r['resolution']}, support {r['support']}, batch {r['batch_size']}:",
      f"  file       {r['file_bpd']:.4f} bpd ({r['file_bytes']} bytes, header "
      f"{r['header_bytes']})",
      f"  net        {r['net_bpd']:.4f} bpd",
      f"  initial    {r['initial_bits']} bits = {r['initial_bpd']:.4f} bpd amortised "
      f"({r['initial_percent_of_net']:.2f} % of net)",
      f"  bound      {r['bound_bpd']:.4f} ± {r['bound_bpd_stderr']:.4f} bpd (all T terms "
      f"per image, {r['bound_draws']} draw(s))",
      f"  net − bound {r['net_minus_bound_bpd']:+.4f} ± {r['net_minus_bound_stderr']:.4f} "
      f"bpd per image, paired ({r['net_minus_bound_percent']:+.2f} %)",
      f"  encode {r['encode_seconds']:.1f} s ({r['encode_network_seconds']:.1f} network, "
      f"{r['encode_coding_seconds']:.1f} entropy coding), decode "
      f"{r['decode_seconds']:.1f} s ({r['decode_network_seconds']:.1f} network, "
      f"{r['decode_coding_seconds']:.1f} entropy coding)"])


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  flags.DEFINE_string('workdir', None, 'The trained model\'s workdir.')
  flags.DEFINE_integer('timesteps', None, 'T; default config.codec.timesteps.')
  flags.DEFINE_integer('num_images', None, 'First N evaluation images; default '
                       'config.eval.num_examples (None = all).')
  flags.DEFINE_integer('bound_draws', 1, 'Independent all-T-term draws of the bound '
                       'per image.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  f = flags.FLAGS
  config = f.config
  results = evaluate(config, f.workdir, f.timesteps or config.codec.timesteps,
                     f.num_images, f.bound_draws)
  print(summary(results))
  with open(os.path.join(f.workdir, RESULTS_FILE), 'w') as out:
    json.dump(results, out, indent=2)
  if f.num_images is not None:
    config.eval.num_examples = f.num_images
  table = codec_compare.compare(config, f.workdir)
  print(codec_compare.markdown(table), end='')
  codec_compare.write(f.workdir, table)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
