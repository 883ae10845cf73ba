r"""Speed of the bits-back codec: encode and decode images/s, network vs entropy coding.

  python experiments/codec_benchmark.py --config=configs/mnist.py --workdir=workdirs/mnist
  python experiments/codec_benchmark.py --config=configs/digits.py   # untrained model

Codes the first --num_images evaluation images twice, bits-back only (pseudo-random
initial bits; the first run compiles the network for each batch bucket and is
discarded), and reports, for encoding and decoding: images/s, and the seconds spent in
the network (jitted ε̂ and p(x|z_0) calls, host transfers included), in entropy coding
(constriction's pops and pushes with the array arithmetic that feeds them) and
elsewhere. Without --workdir the model is initialised from the config (same speed as
a trained one). --nocompiler_options compiles the network without
vdm_jax/runtime/compiler.py's options (as format version 1 files are decoded), for
comparisons in alternating processes:

  for i in 1 2 3; do for o in --nocompiler_options --compiler_options; do
    python experiments/codec_benchmark.py --config=configs/mnist.py --workdir=W \
        --num_images=16 --first_group=16 $o --out=run_$i$o.json; done; done
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from vdm_jax import codec
from vdm_jax.codec import tools as codec_tools
from vdm_jax.data import datasets
from vdm_jax.model import vdm
from vdm_jax.runtime import compiler
from vdm_jax.runtime import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position


def model_and_params(config, workdir, image_shape):
  if workdir:
    return codec_tools.restore(config, workdir)[:2]
  model = vdm.VDM.from_config(config.model)
  x = jnp.zeros((1,) + tuple(image_shape), jnp.int32)
  params = model.init({'params': jax.random.key(0), 'sample': jax.random.key(1)}, x,
                      jnp.zeros((1,)))['params']
  return model, params


def benchmark(config, workdir, num_images: int, timesteps: int,
              first_group: int = 1) -> dict:
  images = np.asarray(datasets.load_split(config.data, config.eval.split)[:num_images])
  model, params = model_and_params(config, workdir, images.shape[1:])
  c = config.codec
  kwargs = dict(timesteps=timesteps, batch_size=c.batch_size, first_group=first_group,
                resolution=c.resolution, first_resolution=c.first_resolution,
                first_images=c.first_images, support=c.support, conventional_images=0,
                fallback=False, step_placement=c.step_placement)
  codec.decompress(model, params, codec.compress(model, params, images, **kwargs)[0])
  data, report = codec.compress(model, params, images, **kwargs)
  timings = {}
  decoded = codec.decompress(model, params, data, timings=timings)
  assert np.array_equal(decoded, images)
  rows = {}
  for name, total, network, coding in (
      ('encode', report.seconds_total, report.seconds_network, report.seconds_coding),
      ('decode', timings['seconds_total'], timings['seconds_network'],
       timings['seconds_coding'])):
    rows[name] = dict(images_per_second=len(images) / total, seconds=total,
                      network_share=network / total, coding_share=coding / total,
                      other_share=(total - network - coding) / total)
  return dict(num_images=len(images), image_shape=list(images.shape[1:]),
              timesteps=timesteps, batch_size=c.batch_size,
              groups=list(report.group_sizes), net_bpd=report.net_bpd,
              device=str(jax.devices()[0].device_kind),
              compiler_options=compiler.compiler_options(), **rows)


def markdown(r: dict) -> str:
  lines = [f"{r['num_images']} images {tuple(r['image_shape'])}, T = {r['timesteps']}, "
           f"batch {r['batch_size']}, {len(r['groups'])} groups, on {r['device']}:", '',
           '| | images/s | seconds | network | entropy coding | other |',
           '|---|---|---|---|---|---|']
  for name in ('encode', 'decode'):
    x = r[name]
    lines.append(f"| {name} | {x['images_per_second']:.2f} | {x['seconds']:.1f} | "
                 f"{100 * x['network_share']:.0f} % | {100 * x['coding_share']:.0f} % | "
                 f"{100 * x['other_share']:.0f} % |")
  return '\n'.join(lines) + '\n'


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  flags.DEFINE_string('workdir', None, 'A trained model\'s workdir; without it the '
                      'model is initialised from the config.')
  flags.DEFINE_integer('num_images', 64, 'Evaluation images coded.')
  flags.DEFINE_integer('timesteps', None, 'T; default config.codec.timesteps.')
  flags.DEFINE_integer('first_group', 1, 'Least images in the first group (and so its '
                       'network batch).')
  flags.DEFINE_bool('compiler_options', True, 'Compile with compiler.py\'s options.')
  flags.DEFINE_string('out', None, 'Also write the JSON here.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory.keep_freed_memory()
  f = flags.FLAGS
  if not f.compiler_options:
    compiler.compiler_options = dict  # no options, as for version 1 files
  r = benchmark(f.config, f.workdir, f.num_images, f.timesteps or f.config.codec.timesteps,
                f.first_group)
  print(markdown(r), end='')
  print(json.dumps(r, indent=2))
  if f.out:
    with open(f.out, 'w') as out:
      json.dump(r, out, indent=2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
