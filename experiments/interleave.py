r"""experiments/benchmark.py at two commits, in alternating processes, with min and median.

On a shared or noisy machine single timings vary by tens of percent; a ratio means
something only when both sides ran in the same stretch of time. This script checks out
--base into a temporary git worktree, then runs the benchmark --runs times from each
tree, alternating (base, this tree, base, …), each in its own process with that tree
first on PYTHONPATH, and prints every process's figures and the ratios of their min
and median (train step: ms/step; evaluation pass: images/s).

  python experiments/interleave.py --base=0cc3ac5 --runs=5 -- \
      --config=configs/mnist.py --config.model.n_embd=32 --config.model.n_layer=4 \
      --config.model.channel_mult='(1,)' --config.model.groupnorm_groups=32 \
      --config.model.p_drop=0.1 --config.model.weighting=elbo \
      --config.training.batch_size=32 --config.training.steps_per_call=1 \
      --eval_batch_size=32 --repeats=5 --skip_sampler

Arguments after `--` go to benchmark.py unchanged. --out writes every run's JSON.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(tree: str, args: list[str], out: str) -> dict:
  """One benchmark process from `tree`; its JSON."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [tree] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  cmd = [sys.executable, os.path.join(tree, 'experiments', 'benchmark.py'), *args,
         f'--out={out}']
  done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'benchmark failed in {tree}:\n{done.stderr[-3000:]}')
  with open(out) as f:
    return json.load(f)


def figures(result: dict) -> dict:
  """The figures compared: train ms/step and evaluation images/s."""
  out = {'train_ms': 1e3 * result['train']['seconds_per_step']}
  if 'eval' in result:
    out['eval_img_s'] = result['eval']['images_per_s']
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--base', required=True, help='The commit to compare against.')
  parser.add_argument('--runs', type=int, default=5, help='Processes of each.')
  parser.add_argument('--out', help='Write every run\'s JSON here.')
  parser.add_argument('benchmark_args', nargs=argparse.REMAINDER)
  a = parser.parse_args()
  args = [x for x in a.benchmark_args if x != '--']
  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                        capture_output=True, text=True, check=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    base_tree = os.path.join(tmp, 'base')
    subprocess.run(['git', 'worktree', 'add', '--detach', base_tree, a.base], cwd=ROOT,
                   check=True, capture_output=True)
    try:
      runs = {a.base: [], head: []}
      for i in range(a.runs):
        for name, tree in ((a.base, base_tree), (head, ROOT)):
          r = figures(run_once(tree, args, os.path.join(tmp, f'{name}_{i}.json')))
          runs[name].append(r)
          print(f'run {i} {name}: ' + ', '.join(f'{k} {v:.1f}' for k, v in r.items()),
                flush=True)
    finally:
      subprocess.run(['git', 'worktree', 'remove', '--force', base_tree], cwd=ROOT,
                     capture_output=True)
  summary = {}
  for key, better in (('train_ms', min), ('eval_img_s', max)):
    if key not in runs[head][0]:
      continue
    vals = {n: [r[key] for r in rs] for n, rs in runs.items()}
    best = {n: better(v) for n, v in vals.items()}
    med = {n: statistics.median(v) for n, v in vals.items()}
    # Speed-up of this tree over the base: >1 is faster.
    flip = (lambda b, h: b / h) if key == 'train_ms' else (lambda b, h: h / b)
    summary[key] = dict(values=vals, best=best, median=med,
                        speedup_best=flip(best[a.base], best[head]),
                        speedup_median=flip(med[a.base], med[head]))
    print(f'{key}: best {best[a.base]:.1f} → {best[head]:.1f} '
          f'({summary[key]["speedup_best"]:.2f}×), median {med[a.base]:.1f} → '
          f'{med[head]:.1f} ({summary[key]["speedup_median"]:.2f}×)')
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(dict(base=a.base, head=head, runs=runs, summary=summary), f, indent=2)


if __name__ == '__main__':
  main()
