r"""--mode=phema: the bound of the post-hoc EMA against its width σ_rel, on validation data.

  python -m vdm_jax.main --config=configs/digits.py --workdir=workdirs/digits \
      --mode=phema --config.data.validation_size=300 --config.eval.num_draws=4

For each σ_rel of config.phema.candidates the EMA is reconstructed from the snapshots of
the workdir (docs/maths.md §14) and its bound evaluated on the 'validation' split: the
last data.validation_size images of the train split, which the run must not have
trained on (checked against its config.json). Never the test split. The curve, each
point paired per image against the EMA of optimizer.ema_rate, goes to phema_results.json
and phema_curve.png in the workdir; the best σ_rel is then used by every command given
--config.eval.phema_sigma_rel=σ_rel.
"""

import io
import math

import jax
import numpy as np

from vdm_jax import build as build_lib
from vdm_jax.data import datasets
from vdm_jax.evaluation import evaluate
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import phema
from vdm_jax import validation

RESULTS_FILE = 'phema_results.json'
PLOT_FILE = 'phema_curve.png'


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  n = len(values)
  return float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def check_held_out(config, wd: workdir_lib.Workdir, info: datasets.DatasetInfo) -> None:
  """Refuses a validation split that overlaps the images the workdir's run trained on."""
  held_out = config.data.validation_size
  if held_out < 1:
    raise validation.ConfigError([
        '--mode=phema evaluates on the validation split: set config.data.validation_size '
        'to the number of training images held out of training (the same value the run '
        'was trained with, or fewer than the images it left unused).'])
  saved = wd.read_config()
  if saved is None:
    raise workdir_lib.WorkdirError(
        f'{wd.path / workdir_lib.CONFIG_FILE} is missing: without it the images the run '
        'trained on are unknown, and a validation split could overlap them.')
  data = saved.get('data', {})
  total = info.num_train + info.num_validation  # the dataset's whole train split
  trained = data.get('num_train') or total - data.get('validation_size', 0)
  if trained > total - held_out:
    raise validation.ConfigError([
        f'config.data.validation_size = {held_out}: the run in {wd} trained on the first '
        f'{trained} of the {total} training images, so the last {held_out} overlap them. '
        f'Use at most {total - trained} (train with data.validation_size set to hold '
        'images out).'])


def select_workdir(config, workdir, mesh=None) -> dict:
  """Evaluates every candidate σ_rel on the validation split; writes and returns the curve."""
  wd = workdir_lib.Workdir(workdir)
  config = config.copy_and_resolve_references()
  config.eval.phema_sigma_rel = None
  config.eval.split, config.eval.num_examples = 'validation', None
  run, state = build_lib.restore(config, wd, mesh)
  check_held_out(config, wd, run.info)
  step, candidates = int(state.step), [float(s) for s in config.phema.candidates]
  trees, info = phema.from_workdir(wd, run.abstract_state().params, candidates, step)
  per_image = lambda params: evaluate.per_image(run.model, params, config, run.mesh,
                                                split='validation')['bpd']
  ema = per_image(state.ema_params)
  ema_bpd, ema_stderr = _mean_and_stderr(ema)
  curve = []
  for sigma_rel, params, fit_error in zip(candidates, trees, info['phema_fit_error']):
    bpd = per_image(params)
    mean, stderr = _mean_and_stderr(bpd)
    diff, diff_stderr = _mean_and_stderr(bpd - ema)
    curve.append(dict(sigma_rel=sigma_rel, gamma=phema.sigma_rel_to_gamma(sigma_rel),
                      bpd=mean, bpd_stderr=stderr, minus_ema=diff,
                      minus_ema_stderr=diff_stderr, fit_error=fit_error))
  best = min(curve, key=lambda c: c['bpd'])
  results = dict(
      split='validation', num_examples=len(ema), num_draws=config.eval.num_draws,
      ema_rate=config.optimizer.ema_rate, ema_bpd=ema_bpd, ema_bpd_stderr=ema_stderr,
      curve=curve, chosen_sigma_rel=best['sigma_rel'],
      params=f'phema_sigma_rel={best["sigma_rel"]:g}',
      use=f'--config.eval.phema_sigma_rel={best["sigma_rel"]:g}',
      phema_step=info['phema_step'], phema_snapshots=info['phema_snapshots'])
  wd.write_results(results, step, RESULTS_FILE)
  if jax.process_index() == 0:
    wd.write_file(PLOT_FILE, plot(results))
  return dict(results, step=step)


def plot(results: dict) -> bytes:
  """PNG of the validation bound against σ_rel (log axis), the EMA of optimizer.ema_rate
  as a line; the bars are the standard errors of the paired differences from it (the
  spread between images, common to every point, is left out)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  curve = results['curve']
  fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
  ax.errorbar([c['sigma_rel'] for c in curve], [c['bpd'] for c in curve],
              yerr=[c['minus_ema_stderr'] for c in curve], marker='o', capsize=3,
              label='post-hoc EMA (± paired s.e. against the EMA)')
  ax.axhline(results['ema_bpd'], color='grey', linestyle='--',
             label=f'EMA, rate {results["ema_rate"]:g}')
  ax.axvline(results['chosen_sigma_rel'], color='tab:red', linewidth=0.8,
             label=f'chosen σ_rel = {results["chosen_sigma_rel"]:g}')
  ax.set_xscale('log')
  ax.set_xlabel('σ_rel')
  ax.set_ylabel(f'bound on validation (bpd, {results["num_draws"]} draw(s))')
  ax.set_title(f'{results["num_examples"]} validation images, step {results["phema_step"]}')
  ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png')
  plt.close(fig)
  return buffer.getvalue()


def summary(results: dict) -> str:
  """The curve as a table, the choice and how to use it."""
  lines = [f'validation bound ({results["num_examples"]} images, {results["num_draws"]} '
           f'draw(s)) against σ_rel, from {results["phema_snapshots"]} snapshots up to step '
           f'{results["phema_step"]}:',
           f'  EMA rate {results["ema_rate"]:g}: {results["ema_bpd"]:.4f} ± '
           f'{results["ema_bpd_stderr"]:.4f} bpd',
           '  σ_rel    γ       bpd      − EMA (paired)      fit error']
  for c in results['curve']:
    mark = '  <- chosen' if c['sigma_rel'] == results['chosen_sigma_rel'] else ''
    lines.append(f'  {c["sigma_rel"]:<7g} {c["gamma"]:6.2f}  {c["bpd"]:.4f}  '
                 f'{c["minus_ema"]:+.4f} ± {c["minus_ema_stderr"]:.4f}   {c["fit_error"]:.2g}'
                 f'{mark}')
  lines.append(f'Use it: {results["use"]} (with --mode=eval, sample, compress).')
  return '\n'.join(lines)
