r"""The post-hoc EMA chosen on validation data against the EMA, on the test split, paired.

  python -m vdm_jax.main --config=configs/digits.py --workdir=workdirs/digits_val \
      --config.data.validation_size=300
  python -m vdm_jax.main --config=configs/digits.py --workdir=workdirs/digits_val \
      --config.data.validation_size=300 --config.eval.num_draws=4 --mode=phema
  python experiments/phema_paired.py --config=configs/digits.py \
      --workdir=workdirs/digits_val --config.data.validation_size=300 \
      --config.eval.num_draws=4

Reads the σ_rel that --mode=phema chose (phema_results.json; --sigma_rel overrides it),
reconstructs that post-hoc EMA (docs/maths.md §14) and evaluates the test bound of it
and of the EMA of optimizer.ema_rate, eval.num_draws draws per image; the draws depend
only on the seed and the image's position, so the per-image difference is paired. Prints
both bounds with their standard errors and the mean paired difference with its standard
error; writes them to WORKDIR/phema_test.json.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from vdm_jax import build
from vdm_jax.evaluation import evaluate
from vdm_jax.evaluation import posthoc_ema
from vdm_jax.runtime import workdir as workdir_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags (defined when run, not when imported by other scripts or tests)."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'A run trained with data.validation_size > 0.')
  flags.DEFINE_float('sigma_rel', None,
                     'σ_rel to compare (default: the one --mode=phema chose).')
  flags.mark_flags_as_required(['config', 'workdir'])


def _mean_stderr(values) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))


def compare(config, workdir: str, sigma_rel=None) -> dict:
  """{ema, phema, difference: (mean, stderr)} of the test bound, and the σ_rel used."""
  wd = workdir_lib.Workdir(workdir)
  if sigma_rel is None:
    chosen = json.loads((wd.path / posthoc_ema.RESULTS_FILE).read_text())
    sigma_rel = chosen['chosen_sigma_rel']
  config = config.copy_and_resolve_references()
  config.eval.split = 'test'
  config.eval.phema_sigma_rel = None
  run, state = build.restore(config, wd)
  ema = evaluate.per_image(run.model, state.ema_params, config, run.mesh)['bpd']
  config.eval.phema_sigma_rel = sigma_rel
  run, state = build.restore(config, wd)
  phema = evaluate.per_image(run.model, state.ema_params, config, run.mesh)['bpd']
  results = dict(sigma_rel=sigma_rel, step=int(state.step), num_examples=len(ema),
                 num_draws=config.eval.num_draws, ema=_mean_stderr(ema),
                 phema=_mean_stderr(phema), difference=_mean_stderr(phema - ema))
  wd.write_file('phema_test.json', json.dumps(results, indent=2).encode())
  return results


def main(argv):
  del argv
  r = compare(FLAGS.config, FLAGS.workdir, FLAGS.sigma_rel)
  print(f"test bound, {r['num_examples']} images x {r['num_draws']} draw(s), step {r['step']}:")
  print(f"  EMA (rate {FLAGS.config.optimizer.ema_rate:g}):  {r['ema'][0]:.4f} ± {r['ema'][1]:.4f}")
  print(f"  post-hoc EMA σ_rel={r['sigma_rel']:g}: {r['phema'][0]:.4f} ± {r['phema'][1]:.4f}")
  print(f"  paired difference: {r['difference'][0]:+.4f} ± {r['difference'][1]:.4f} bpd")


if __name__ == '__main__':
  _define_flags()
  app.run(main)
