r"""File sizes of the codec against JPEG XL, WebP lossless and PNG, for files of N images.

  python experiments/codec_sizes.py --config=configs/mnist.py --workdir=workdirs/mnist \
      --num_images=1,3,10,100

For each N, codes the first N evaluation images (config.eval.split) into one file with
the workdir's model and the settings of config.codec (vdm_jax/codec/compressor.py),
decodes it and checks every image, and sets its size beside the conventional codes of
the same images (experiments/codec_compare.py: JPEG XL at effort 9, WebP lossless,
PNG), each the better of one file per image (headers included) and the N images as one
picture (as a file's conventional part stores them; marked *), and the smallest of them
all: the file is never more than its header above it.
With --designs=file,bits-back it also writes, for the same images, the bits-back
stream from pseudo-random initial bits alone (docs/maths.md §9), whose net length is
the reference the file is compared with. Prints a Markdown table; --output writes the
rows as JSON.
"""

import json
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
from vdm_jax.codec import tools as codec_tools
from vdm_jax.data import datasets
from vdm_jax.runtime import host_memory
# pylint: enable=g-import-not-at-top,wrong-import-position

DESIGNS = {'file': {}, 'bits-back': dict(conventional_images=0, fallback=False)}


def references(images: np.ndarray) -> dict:
  """{codec: dict(bytes, per_image_bytes, one_picture_bytes)}: each conventional code of
  the images, bytes the better of one file per image and all of them as one picture."""
  refs = {}
  for row in codec_compare.codec_rows(images):
    ways = [b for b in (row['per_image_bytes'], row['one_picture_bytes']) if b is not None]
    refs[row['method']] = dict(bytes=min(ways), per_image_bytes=row['per_image_bytes'],
                               one_picture_bytes=row['one_picture_bytes'])
  return refs


def measure(model, params, images, step, designs, decode=True, **settings) -> list:
  """One row per design for these images: bytes, bpd, what the file holds, times."""
  n, dims = len(images), images[0].size
  refs = references(images)
  best = min(refs, key=lambda name: refs[name]['bytes'])
  rows = []
  for design in designs:
    data, report = codec.compress(model, params, images, step=step, **DESIGNS[design],
                                  **settings)
    seconds = time.perf_counter()
    if decode and not np.array_equal(codec.decompress(model, params, data), images):
      raise AssertionError(f'{design}: the file did not decode to the images.')
    rows.append(dict(
        num_images=n, design=design, method=report.method, bytes=len(data),
        bpd=8 * len(data) / (n * dims), header_bytes=report.header_bits // 8,
        conventional_images=report.conventional_images,
        conventional_bytes=report.conventional_bits // 8, net_bits=report.net_bits,
        initial_bits=report.initial_bits, groups=len(report.group_sizes),
        references=refs, best_conventional=best,
        best_conventional_bytes=refs[best]['bytes'],
        over_best_bytes=len(data) - refs[best]['bytes'],
        encode_seconds=report.seconds_total,
        decode_seconds=time.perf_counter() - seconds if decode else None))
  reference = [r for r in rows if r['design'] == 'bits-back']
  for r in rows:
    if reference and not r['conventional_images']:
      r['net_bpd'] = r['net_bits'] / (n * dims)
    if reference:
      r['over_net_percent'] = 100 * (8 * r['bytes'] / reference[0]['net_bits'] - 1)
  return rows


def _reference_cell(r: dict, codec_name: str, dims: int) -> str:
  ref = r['references'][codec_name]
  star = '*' if ref['bytes'] != ref['per_image_bytes'] else ''
  return f"{8 * ref['bytes'] / (r['num_images'] * dims):.3f} ({ref['bytes']:,}{star})"


def markdown(rows: list, dims: int) -> str:
  """The rows as a table; dims: H·W·C of one image."""
  codecs = list(codec_compare.CODECS)[::-1]  # JPEG XL, WebP, PNG
  lines = ['| N | design | file bpd (bytes) | holds | '
           + ' | '.join(f'{c} bpd (bytes)' for c in codecs)
           + ' | file − best conventional | file over net | encode s |',
           '|---' * (7 + len(codecs)) + '|']
  for r in rows:
    over_net = f"{r['over_net_percent']:+.1f} %" if 'over_net_percent' in r else ''
    holds = r['method'] + (f", {r['conventional_images']} conventional"
                           if 0 < r['conventional_images'] < r['num_images'] else '')
    lines.append(
        f"| {r['num_images']} | {r['design']} | {r['bpd']:.3f} ({r['bytes']:,}) | {holds} | "
        + ' | '.join(_reference_cell(r, c, dims) for c in codecs)
        + f" | {r['over_best_bytes']:+,} B ({r['best_conventional']}) | {over_net} | "
        f"{r['encode_seconds']:.0f} |")
  lines += ['', 'Conventional codes: the better of one file per image (headers included) '
            'and the N images as one picture (*).']
  return '\n'.join(lines) + '\n'


def _define_flags() -> None:
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  flags.DEFINE_string('workdir', None, 'The trained model\'s workdir.')
  flags.DEFINE_list('num_images', ['1', '3', '10', '100'], 'File sizes N to code.')
  flags.DEFINE_list('designs', ['file'], 'file (the default compress), bits-back '
                    '(pseudo-random initial bits only; the net reference).')
  flags.DEFINE_bool('decode', True, 'Decode every file and check it.')
  flags.DEFINE_string('output', None, 'JSON file for the rows.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  host_memory.keep_freed_memory()
  config = f.config
  images = np.asarray(datasets.load_split(config.data, config.eval.split))
  model, params, step = codec_tools.restore(config, f.workdir)
  settings = dict(codec_tools.codec_kwargs(config), batch_size=config.codec.batch_size,
                  first_group=config.codec.first_group,
                  step_placement=config.codec.step_placement)
  rows = []
  for n in map(int, f.num_images):
    rows += measure(model, params, images[:n], step, f.designs, f.decode, **settings)
    print(markdown(rows[-len(f.designs):], images[0].size), end='', flush=True)
    if f.output:
      with open(f.output, 'w') as out:
        json.dump(rows, out, indent=2)
  print(markdown(rows, images[0].size), end='')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
