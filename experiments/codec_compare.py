r"""Likelihood as compression: a model's test bpd beside JPEG XL, WebP lossless and PNG.

  python experiments/codec_compare.py --config=configs/mnist.py --workdir=workdirs/mnist

Codes the evaluation split's images (config.eval.split, the first
config.eval.num_examples of them, as `--mode=eval` does) with each conventional
lossless code of vdm_jax/codec/conventional.py: JPEG XL (imagecodecs/libjxl,
lossless=True, effort=9), WebP (Pillow, lossless=True, quality=100, method=6) and PNG
(Pillow, optimize=True, compress_level=9), two ways, each checked to decode exactly:

  per image    one file per image, headers included: mean ± standard error over images
  one picture  the N images stacked vertically as one picture, stored as a codec file's
               conventional part stores it (without the RIFF header of WebP or the
               signature of JPEG XL): what a file of N images must beat

and reports the better of the two as the codec's bpd = 8·bytes/(N·H·W·C). The model's
row is WORKDIR/eval_results.json (`--mode=eval`): its variational bound, the code
length that bits-back coding with the model approaches; the row "VDM bits-back (actual
file)" is WORKDIR/codec_eval.json (experiments/codec_eval.py): the size of one real file
holding all the images, which decodes to them bit for bit.
Prints a Markdown table and writes WORKDIR/compression.md and compression.json.

Codec bits are bits per stored 8-bit sub-pixel; for data with V < 256 values (the
digits config, V = 17) the codecs store the same integers, so the numbers compare.
"""

import json
import math
import os
import sys

# vdm_jax imports uninstalled too (from the repository root).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from vdm_jax.codec import conventional
from vdm_jax.codec.conventional import CODECS
from vdm_jax.codec.conventional import decode
from vdm_jax.codec.conventional import encode
from vdm_jax.data import datasets
# pylint: enable=g-import-not-at-top,wrong-import-position

RESULTS_FILE = 'eval_results.json'
CODEC_FILE = 'codec_eval.json'  # written by experiments/codec_eval.py


def codec_bpd(images: np.ndarray, codec: str, check: bool = True) -> np.ndarray:
  """Per-image bits per dimension of the codec; checks the round trip."""
  dims = math.prod(images.shape[1:])
  bpd = np.empty(len(images))
  for i, image in enumerate(images):
    data = encode(image, codec)
    if check and not np.array_equal(decode(data, image.shape[-1]), image):
      raise AssertionError(f'{codec} did not round-trip image {i}.')
    bpd[i] = 8 * len(data) / dims
  return bpd


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
  n = len(values)
  stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float('nan')
  return float(np.mean(values)), stderr


def one_picture_bytes(images: np.ndarray) -> dict:
  """{codec: bytes} of the uint8 images [N, H, W, C] as one picture, as a codec file's
  conventional part stores them (conventional.candidates); checks each round trip."""
  n, shape = len(images), images.shape[1:]
  sizes = {}
  for method, data in conventional.candidates(images, 256):
    if method != conventional.RAW:
      if not np.array_equal(conventional.decode_set(method, data, n, shape, 256), images):
        raise AssertionError(f'{conventional.NAMES[method]} did not round-trip the picture.')
      sizes[conventional.NAMES[method]] = len(data)
  return sizes


def codec_rows(images: np.ndarray) -> list:
  """One row per conventional code: per image, one picture, and the better of the two."""
  n, dims = len(images), math.prod(images.shape[1:])
  pictures = one_picture_bytes(images)
  rows = []
  for codec in CODECS:
    per_image = codec_bpd(images, codec)
    mean, stderr = mean_stderr(per_image)
    one = 8 * pictures[codec] / (n * dims) if codec in pictures else None
    first = one is None or mean <= one
    better = 'per image' if first else 'one picture'
    rows.append(dict(
        method=codec, bpd=mean if first else one, bpd_stderr=stderr if first else math.nan,
        per_image_bpd=mean, one_picture_bpd=one,
        per_image_bytes=int(round(per_image.sum() * dims / 8)),
        one_picture_bytes=pictures.get(codec), notes=f'{CODECS[codec][2]}; {better} better'))
  return rows


def _read_json(workdir: str, name: str):
  """WORKDIR/NAME as a dict, or None when it does not exist."""
  path = os.path.join(workdir, name)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def model_row(workdir: str, num_images: int, split: str):
  """The table row of WORKDIR/eval_results.json, or None when it does not exist."""
  r = _read_json(workdir, RESULTS_FILE)
  if r is None:
    return None
  t = r.get('timesteps')
  notes = [f"variational bound, {r.get('params', '?')} params at step "
           f"{r.get('step', '?')}, {r.get('num_draws', '?')} draw(s) per image, "
           f"T = {'continuous' if not t else t}"]
  if r.get('num_examples') != num_images or r.get('split', split) != split:
    notes.append(f"WARNING: evaluated on {r.get('num_examples')} images of split "
                 f"'{r.get('split')}', the codecs on {num_images} of '{split}'")
  return dict(method='VDM (this model)', bpd=float(r['bpd']),
              bpd_stderr=float(r.get('bpd_stderr', float('nan'))),
              notes='; '.join(notes))


def codec_row(workdir: str, num_images: int, split: str):
  """The row of WORKDIR/codec_eval.json (a real bits-back file), or None."""
  r = _read_json(workdir, CODEC_FILE)
  if r is None:
    return None
  notes = [f"one file of {r['file_bytes']} bytes (header and {r['initial_bits']} initial "
           f"bits included), T = {r['timesteps']}; net {r['net_bpd']:.4f} bpd against the "
           f"T-step bound {r['bound_bpd']:.4f}: {r['net_minus_bound_bpd']:+.4f} ± "
           f"{r['net_minus_bound_stderr']:.4f} per image; decoded and checked"]
  if r['num_images'] != num_images or r['split'] != split:
    notes.append(f"WARNING: coded {r['num_images']} images of split '{r['split']}', the "
                 f"codecs {num_images} of '{split}'")
  return dict(method='VDM bits-back (actual file)', bpd=float(r['file_bpd']),
              bpd_stderr=float('nan'), notes='; '.join(notes))


def compare(config, workdir=None) -> dict:
  """Codec and model bpd on the evaluation images of `config`; JSON-ready."""
  split = config.eval.split
  images = datasets.load_split(config.data, split)
  if config.eval.num_examples is not None:
    images = images[:config.eval.num_examples]
  rows = codec_rows(images)
  model = model_row(workdir, len(images), split) if workdir else None
  if model:
    rows.append(model)
  coded = codec_row(workdir, len(images), split) if workdir else None
  if coded:
    rows.append(coded)
  return dict(dataset=config.data.dataset, split=split, num_images=len(images),
              image_shape=list(images.shape[1:]), rows=rows,
              eval_results=os.path.join(workdir, RESULTS_FILE) if model else None)


def markdown(results: dict) -> str:
  h, w, c = results['image_shape']
  lines = [f"{results['num_images']} images of {results['dataset']} "
           f"'{results['split']}' ({h}x{w}x{c}), bits per dimension; a conventional "
           'code\'s bpd is the better of one file per image (mean ± standard error over '
           'images, headers included) and all images as one picture:', '',
           '| method | bpd | ± stderr | per image | one picture | notes |',
           '|---|---|---|---|---|---|']
  for r in results['rows']:
    stderr = '' if math.isnan(r['bpd_stderr']) else f"{r['bpd_stderr']:.3f}"
    ways = [f'{r[k]:.3f}' if r.get(k) is not None else ''
            for k in ('per_image_bpd', 'one_picture_bpd')]
    lines.append(f"| {r['method']} | {r['bpd']:.3f} | {stderr} | {' | '.join(ways)} | "
                 f"{r['notes']} |")
  if results['eval_results'] is None:
    lines += ['', 'No model row: no eval_results.json (pass the --workdir of a model '
              'evaluated with `python -m vdm_jax.main --mode=eval`).']
  return '\n'.join(lines) + '\n'


def write(workdir: str, results: dict) -> None:
  with open(os.path.join(workdir, 'compression.md'), 'w') as f:
    f.write(markdown(results))
  with open(os.path.join(workdir, 'compression.json'), 'w') as f:
    json.dump(results, f, indent=2)


def _define_flags() -> None:
  """Only when run as a script: importing this file must not define global flags."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file (configs/*.py); --config.a.b=value overrides.')
  flags.DEFINE_string(
      'workdir', None, 'The model\'s workdir: reads eval_results.json, writes '
      'compression.md and compression.json. Without it, the codecs only.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdir = flags.FLAGS.workdir
  if workdir and not os.path.isdir(workdir):
    print(f'error: --workdir={workdir} is not a directory.', file=sys.stderr)
    sys.exit(2)
  results = compare(flags.FLAGS.config, workdir)
  print(markdown(results), end='')
  if workdir:
    write(workdir, results)
    print(f"Written to {os.path.join(workdir, 'compression.md')} and .json.")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
