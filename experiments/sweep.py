r"""Sweeps: one `vdm_jax.main` job per point of a grid of `--config` overrides.

  python experiments/sweep.py --config=configs/test.py --root=workdirs/sweep1 \
      --product model.timesteps=0,10 --product optimizer.learning_rate=1e-3,3e-3 \
      --set training.num_steps=20

The grid is the Cartesian product of the `--product` axes and of one `--zip` group
(axes advanced together, so they need equal lengths). Values are split on top-level
commas (commas inside (), [], {} or quotes belong to the value, so tuples work:
`--product eval.discrete_timesteps=(10,100),(1000,)`) and reach the config verbatim
as `--config.KEY=VALUE`, parsed by ml_collections as `vdm_jax.main` would parse them.
`--set KEY=VALUE` applies to every point. Every override of every point is checked
against the config before anything runs.

Each point trains in ROOT/NAME, NAME being its settings in sorted key order, e.g.
`model.timesteps=10,optimizer.learning_rate=3e-3` (characters other than letters,
digits and `._-+=` become `_`, and a short hash of the settings is appended when that
happened or the name is long). Names carry no timestamps, so the same command run
again resumes unfinished points and skips finished ones (those whose
eval_results.json has reached training.num_steps; `--force` reruns them).

Modes:
  --mode=run     Run the points here, one after another (`--jobs N`: N at a time),
                 each as `python -m vdm_jax.main --mode=M` for each M of `--modes`
                 (default train,eval), with its output in ROOT/NAME/sweep.log. A
                 failing point is reported and the sweep goes on; the exit status is
                 1 if any failed. Ctrl-C lets running points checkpoint, then stops
                 (exit status 75: run the same command again to continue).
  --mode=print   Write one shell command per point (stdout, or `--out FILE`), to be
                 run from the repository root (or with vdm_jax installed) on a
                 cluster, e.g. as a SLURM array, one line per task:
                   python experiments/sweep.py ... --mode=print --out=jobs.txt
                   sbatch --array=1-$(wc -l < jobs.txt) \
                       --wrap='eval "$(sed -n ${SLURM_ARRAY_TASK_ID}p jobs.txt)"'
  --collect      Only gather the table (e.g. after the cluster jobs finished).

After `--mode=run` (and with `--collect`), every point's eval_results.json goes into
one table, printed as Markdown and written to ROOT/results.md and ROOT/results.csv:
the swept settings, then bpd, bpd_stderr, the three terms and the step (and bpd_T<T>
for each T of eval.discrete_timesteps). Points without results have empty cells.
`--collect` alone lists every point found under ROOT (via ROOT/*/sweep_point.json).

ROOT may be a bucket, gs://BUCKET/PATH (vdm_jax/runtime/gcs.py: the clients and their
credentials): every file of the sweep goes through etils.epath, and each point's
sweep.log is written locally while its command runs, then appended to the bucket's.
"""

import argparse
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # vdm_jax's configs import it, installed or not.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import sweep_files
from sweep_grid import expand_grid
from sweep_grid import load_config
from sweep_grid import main_command
from sweep_grid import make_points
from sweep_grid import overrides
from sweep_grid import parse_setting
from sweep_grid import Point
from sweep_grid import POINT_FILE
from sweep_grid import SweepError
from sweep_tables import find_points
from sweep_tables import RESULTS_FILE
from sweep_tables import write_tables

LOG_FILE = 'sweep.log'
MODES = ('train', 'eval', 'sample')
PREEMPTED_EXIT_CODE = 75  # vdm_jax.errors.PREEMPTED_EXIT_CODE (importing vdm_jax imports jax).


# ------------------------------------------------------------------- running


def _log(lock: threading.Lock, message: str) -> None:
  with lock:
    print(message, flush=True)


def is_done(workdir: str, num_steps: int) -> bool:
  """True when eval_results.json exists and was computed at step >= num_steps."""
  results = sweep_files.read_json(sweep_files.path(workdir) / RESULTS_FILE)
  try:
    return int(results.get('step', -1)) >= num_steps
  except (TypeError, ValueError):
    return False


def _write_point_file(point: Point, config: str, fixed: dict) -> None:
  folder = sweep_files.path(point.workdir)
  folder.mkdir(parents=True, exist_ok=True)
  sweep_files.write_text(folder / POINT_FILE, json.dumps(
      dict(settings=point.settings, fixed=fixed, config=config), indent=2))


def _tail(path: str, lines: int = 15) -> str:
  text = sweep_files.path(path).read_bytes().decode(errors='replace')
  return ''.join(text.splitlines(keepends=True)[-lines:])


def _run_one(cmd: list[str], log_path: str) -> int:
  """Runs cmd (in a worker thread) with its output appended to log_path (on gs://,
  written locally first, then appended to the object once the command ends)."""
  remote = log_path.startswith('gs://')
  with tempfile.TemporaryDirectory(prefix='sweep_') as tmp:
    local = os.path.join(tmp, LOG_FILE) if remote else log_path
    with open(local, 'a') as log:
      log.write(f'\n$ {shlex.join(cmd)}\n')
      log.flush()
      path = os.environ.get('PYTHONPATH')
      env = dict(os.environ, PYTHONPATH=_REPO + (os.pathsep + path if path else ''))
      rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                          check=False).returncode
    if remote:
      target = sweep_files.path(log_path)
      with open(local, 'rb') as f:
        target.write_bytes((target.read_bytes() if target.exists() else b'') + f.read())
  return rc


def run_point(point: Point, index: str, args, fixed: dict, num_steps: int,
              stop: threading.Event, lock: threading.Lock) -> str:
  """Runs every mode of one point; returns 'done', 'skipped', 'failed' or 'stopped'."""
  if stop.is_set():
    return 'stopped'
  _write_point_file(point, args.config, fixed)
  if not args.force and is_done(point.workdir, num_steps):
    _log(lock, f'{index} {point.name}: done, skipped (--force reruns it)')
    return 'skipped'
  log_path = os.path.join(point.workdir, LOG_FILE)
  for mode in args.modes:
    if stop.is_set():
      return 'stopped'
    start = time.time()
    cmd = main_command(args.python or sys.executable, args.config, point.workdir, mode,
                       overrides(point.settings, fixed))
    rc = _run_one(cmd, log_path)
    took = f'{time.time() - start:.0f} s'
    if rc == PREEMPTED_EXIT_CODE or stop.is_set():
      _log(lock, f'{index} {point.name}: {mode} stopped after {took} (rc {rc})')
      return 'stopped'
    if rc:
      _log(lock, f'{index} {point.name}: {mode} FAILED after {took} (rc {rc}); '
           f'log {log_path}, last lines:\n{_tail(log_path)}')
      return 'failed'
    _log(lock, f'{index} {point.name}: {mode} ok ({took})')
  return 'done'


def run_sweep(points: list[Point], configs: list, args, fixed: dict) -> dict:
  """Runs the points, `args.jobs` at a time; returns {point name: outcome}."""
  stop, lock = threading.Event(), threading.Lock()
  n = len(points)
  with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = {
        pool.submit(run_point, p, f'[{i + 1}/{n}]', args, fixed,
                    int(c.training.num_steps), stop, lock): p.name
        for i, (p, c) in enumerate(zip(points, configs))}
    pending = set(futures)
    while pending:
      try:
        _, pending = concurrent.futures.wait(pending)
      except KeyboardInterrupt:
        stop.set()
        _log(lock, 'Interrupted: waiting for running points to checkpoint...')
  return {futures[f]: f.result() for f in futures}


# ------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description='Grid sweeps over vdm_jax config overrides.',
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument('--config', help='Config file, as for vdm_jax.main.')
  p.add_argument('--root', required=True, help='Directory holding one workdir per point.')
  p.add_argument('--product', action='append', default=[], metavar='KEY=V1,V2,...',
                 help='An axis of the Cartesian product (repeatable).')
  p.add_argument('--zip', action='append', default=[], metavar='KEY=V1,V2,...',
                 help='An axis of the zipped group (repeatable, equal lengths).')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='An override for every point (repeatable).')
  p.add_argument('--mode', choices=('run', 'print'), default='run')
  p.add_argument('--modes', default='train,eval',
                 help=f'vdm_jax.main modes per point, in order, from {MODES}.')
  p.add_argument('--collect', action='store_true', help='Only gather the table.')
  p.add_argument('--force', action='store_true', help='Rerun finished points too.')
  p.add_argument('--jobs', type=int, default=1, help='Points run at once (--mode=run).')
  p.add_argument('--out', help='--mode=print: write the commands here, not stdout.')
  p.add_argument('--python', help='Interpreter in the commands (default: this one for '
                 "run, 'python' for print).")
  return p


def check_root(root: str) -> None:
  """Raises SweepError, as vdm_jax.main words it for --workdir, where --root cannot hold
  the sweep: a bucket missing or unreachable, or a local path under a file."""
  if root.startswith('gs://'):
    from vdm_jax.runtime import gcs  # imports no JAX
    try:
      gcs.check_access(root, flag='--root')
    except gcs.StorageError as e:
      raise SweepError(str(e)) from e
    return
  folder = os.path.abspath(root)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise SweepError(f'--root={root}: {folder} is a file, not a folder; choose another '
                     '--root (or move the file aside).')


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    check_root(args.root)
    if args.collect:
      points = find_points(args.root)
      if not points:
        raise SweepError(f'No {POINT_FILE} under {args.root}: nothing to collect.')
      print(write_tables(args.root, points), end='')
      return 0
    if not args.config:
      raise SweepError('--config is required (except with --collect).')
    if not os.path.isfile(args.config.split(':')[0]):
      raise SweepError(f'--config={args.config}: no such file.')
    args.modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
      raise SweepError(f'--modes={",".join(args.modes)}: each must be one of {MODES}.')
    if args.jobs < 1:
      raise SweepError(f'--jobs={args.jobs} must be at least 1.')
    fixed = dict(parse_setting(s) for s in args.set)
    points = make_points(args.root, expand_grid(args.product, args.zip))
    both = sorted(set(fixed) & set(points[0].settings))
    if both:
      raise SweepError(f'Both --set and swept: {", ".join(both)}.')
    configs = [load_config(args.config, overrides(p.settings, fixed)) for p in points]
  except SweepError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  if args.mode == 'print':
    lines = []
    for p in points:
      _write_point_file(p, args.config, fixed)
      lines.append(' && '.join(
          shlex.join(main_command(args.python or 'python', args.config, p.workdir, m,
                                  overrides(p.settings, fixed)))
          for m in args.modes))
    text = '\n'.join(lines) + '\n'
    if args.out:
      with open(args.out, 'w') as f:
        f.write(text)
      print(f'{len(lines)} commands written to {args.out}; collect the results with '
            f'--collect --root={args.root}', file=sys.stderr)
    else:
      sys.stdout.write(text)
    return 0

  print(f'{len(points)} point(s) under {args.root}, modes {",".join(args.modes)}, '
        f'{args.jobs} at a time.', flush=True)
  outcomes = run_sweep(points, configs, args, fixed)
  print(write_tables(args.root, points), end='')
  failed = [n for n, o in outcomes.items() if o == 'failed']
  stopped = [n for n, o in outcomes.items() if o == 'stopped']
  print(f'Tables: {os.path.join(args.root, "results.md")}, '
        f'{os.path.join(args.root, "results.csv")}.')
  if failed:
    print(f'{len(failed)} point(s) failed: {", ".join(failed)}', file=sys.stderr)
  if stopped:
    print(f'{len(stopped)} point(s) stopped; run the same command again to continue.',
          file=sys.stderr)
    return PREEMPTED_EXIT_CODE
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
