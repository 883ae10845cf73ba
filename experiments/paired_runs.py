r"""Trained runs compared image by image: the test bound, its paired difference from a
reference run, the diffusion term's estimator variance and the bound against steps.

  python experiments/paired_runs.py --root=workdirs/variants \
      --reference=model.prediction=eps,model.time_sampling=antithetic \
      --figure=docs/variants.png

ROOT holds one workdir per run as experiments/sweep.py writes them (sweep_point.json
beside each). For every run, with its newest checkpoint (the EMA parameters):
- bpd: the test bound, eval.num_draws draws per image (docs/maths.md §3f); evaluation
  draws antithetic time for every run, and the draws depend only on the seed and the
  image's position, so two runs of one seed share them;
- diff: the mean over images of (this run's bound − the reference run's) and its
  standard error over images (paired: the spread between images cancels); the reference
  of a run is the run with the same settings except the keys of --reference;
- var_diff: the estimator variance of the diffusion term per example, in bpd², under the
  run's own training draws (model.time_sampling; the adaptive proposal of its state):
  the variance over --variance_draws draws of each test image, averaged over images;
- var_weighted: the same for the weighted term w(λ)·L_diff that training minimises
  (model.weighting; equal to var_diff for `elbo`), the variance the gradient sees;
- steps_per_s: the training speed TensorBoard recorded (mean of its 30 s reports);
- the figure: the test bound of every eval_results_<step>.json against the step.
The table is printed as Markdown and written to ROOT/paired.md and ROOT/paired.json.
"""

import argparse
import glob
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import sweep_grid
import sweep_tables
from vdm_jax import build
from vdm_jax.data import input_pipeline
from vdm_jax.evaluation import evaluate
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.runtime import host_memory


def load_runs(root: str) -> list[dict]:
  runs = []
  for path in sorted(glob.glob(os.path.join(root, '*', sweep_grid.POINT_FILE))):
    with open(path) as f:
      point = json.load(f)
    workdir = os.path.dirname(path)
    overrides = sweep_grid.overrides(point['settings'], point['fixed'])
    runs.append(dict(settings=point['settings'], workdir=workdir,
                     config=sweep_grid.load_config(point['config'], overrides)))
  return runs


def diffusion_variance(run, state, config, draws: int) -> tuple[float, float]:
  """Mean over test images of the variance over `draws` of L_diff and of w·L_diff (bpd²),
  drawn as the run trained (its time_sampling, and the adaptive proposal of its state)."""
  mc = config.model
  probs = (time_sampling.adaptive_probs(state.time_sampler, mc.adaptive_decay,
                                        mc.adaptive_uniform)
           if mc.time_sampling == 'adaptive' else None)
  params = run.eval_params(state)

  @jax.jit
  def one_draw(images, cond, key):
    out = run.model.apply({'params': params}, images, cond, deterministic=True,
                          bin_probs=probs, rngs={'sample': key})
    terms = jnp.stack([out.loss_diff, out.loss_diff_weighted])
    return vdm.bits_per_dim(terms, math.prod(images.shape[1:]))

  per_image = []
  batches = input_pipeline.eval_batches(config.data, config.eval.split,
                                        global_batch_size=config.eval.batch_size,
                                        num_examples=config.eval.num_examples)
  for i, batch in enumerate(batches):
    keys = jax.random.split(jax.random.key(1000 + i), draws)
    values = np.stack([np.asarray(one_draw(jnp.asarray(batch['images']),
                                           jnp.asarray(batch['conditioning']), k))
                       for k in keys])  # [draws, 2, B]
    per_image.append(values.var(axis=0, ddof=1)[:, np.asarray(batch['mask'], bool)])
  plain, weighted = np.concatenate(per_image, axis=1).mean(axis=1)
  return float(plain), float(weighted)


def steps_per_second(workdir: str) -> float:
  """The mean of the 'steps_per_sec' scalars clu's ReportProgress wrote to TensorBoard."""
  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  if 'steps_per_sec' not in acc.Tags().get('tensors', []):
    return float('nan')
  return float(np.mean([tensor_util.make_ndarray(e.tensor_proto)
                        for e in acc.Tensors('steps_per_sec')]))


def curve(workdir: str) -> tuple[list[int], list[float]]:
  points = []
  for path in glob.glob(os.path.join(workdir, 'eval_results_*.json')):
    with open(path) as f:
      result = json.load(f)
    points.append((int(result['step']), float(result['bpd'])))
  points.sort()
  return [s for s, _ in points], [b for _, b in points]


def label(settings: dict, keys) -> str:
  return ', '.join(f'{k.split(".")[-1]}={settings[k]}' for k in keys if k in settings)


def compare(root: str, reference: dict, variance_draws: int) -> list[dict]:
  runs = load_runs(root)
  for r in runs:
    run, state = build.restore(r['config'], r['workdir'])
    r['step'] = int(jax.device_get(state.step))
    r['per_image'] = evaluate.per_image(run.model, run.eval_params(state), r['config'],
                                        run.mesh)['bpd']
    r['var_diff'], r['var_weighted'] = diffusion_variance(run, state, r['config'],
                                                          variance_draws)
    r['steps_per_s'] = steps_per_second(r['workdir'])
    r['curve'] = curve(r['workdir'])
  rows = []
  for r in runs:
    partner = dict(r['settings'], **reference)
    ref = next((q for q in runs if q['settings'] == partner), None)
    bpd = r['per_image']
    row = dict(settings=r['settings'], step=r['step'], bpd=float(bpd.mean()),
               bpd_stderr=float(bpd.std(ddof=1) / math.sqrt(len(bpd))),
               var_diff=r['var_diff'], var_weighted=r['var_weighted'],
               steps_per_s=r['steps_per_s'], curve=r['curve'])
    if ref is not None and len(ref['per_image']) == len(bpd):
      d = bpd - ref['per_image']
      row.update(diff=float(d.mean()), diff_stderr=float(d.std(ddof=1) / math.sqrt(len(d))))
    rows.append(row)
  return rows


def markdown(rows: list[dict], keys) -> str:
  lines = ['| run | step | test bpd | paired diff | var L_diff (bpd²) | var w·L_diff (bpd²) '
           '| steps/s |', '|---|---|---|---|---|---|---|']
  for r in rows:
    diff = (f"{r['diff']:+.4f} ± {r['diff_stderr']:.4f}" if 'diff' in r else '')
    lines.append(f"| {label(r['settings'], keys)} | {r['step']} | {r['bpd']:.4f} ± "
                 f"{r['bpd_stderr']:.4f} | {diff} | {r['var_diff']:.4g} | "
                 f"{r['var_weighted']:.4g} | {r['steps_per_s']:.1f} |")
  return '\n'.join(lines)


def figure(rows: list[dict], keys, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for r in rows:
    steps, bpd = r['curve']
    if steps:
      ax.plot(steps, bpd, marker='o', markersize=3, label=label(r['settings'], keys))
  ax.set_xlabel('training step')
  ax.set_ylabel('test bound (bpd)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument('--root', required=True, help='A folder of runs written by sweep.py.')
  p.add_argument('--reference', required=True, metavar='KEY=V,KEY=V',
                 help="The settings of each run's reference run.")
  p.add_argument('--variance_draws', type=int, default=16,
                 help='Draws per test image for the estimator variance.')
  p.add_argument('--figure', help='Write the bound-against-steps figure (PNG) here.')
  p.add_argument('--title', default='Test bound during training')
  args = p.parse_args(argv)
  host_memory.keep_freed_memory()
  reference = dict(sweep_grid.parse_setting(s) for s in sweep_grid.split_values(args.reference))
  rows = compare(args.root, reference, args.variance_draws)
  keys = sweep_tables.setting_keys([sweep_grid.Point(r['settings'], '', '') for r in rows])
  table = markdown(rows, keys)
  print(table)
  with open(os.path.join(args.root, 'paired.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.root, 'paired.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  if args.figure:
    figure(rows, keys, args.figure, args.title)
  return 0


if __name__ == '__main__':
  sys.exit(main())
