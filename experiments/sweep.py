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
import csv
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # vdm_jax's configs import it, installed or not.

POINT_FILE = 'sweep_point.json'
RESULTS_FILE = 'eval_results.json'
LOG_FILE = 'sweep.log'
RESULT_COLUMNS = ('bpd', 'bpd_stderr', 'bpd_recon', 'bpd_prior', 'bpd_diff', 'step')
MODES = ('train', 'eval', 'sample')
PREEMPTED_EXIT_CODE = 75  # vdm_jax.errors.PREEMPTED_EXIT_CODE (importing vdm_jax imports jax).
_MAX_NAME = 150
_UNSAFE = re.compile(r'[^A-Za-z0-9._+=-]')
_KEY = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$')


def _path(path: str):
  """`path` (local, or gs://BUCKET/PATH) as an etils.epath.Path."""
  if path.startswith('gs://'):  # vdm_jax.runtime.gcs chooses epath's client for gs://
    importlib.import_module('vdm_jax.runtime.gcs')
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def _write_text(path, text: str) -> None:
  """Replaces the file at `path` (an epath.Path) whole: locally through a temporary
  file renamed into place; on gs:// an upload replaces an object whole."""
  if str(path).startswith('gs://'):
    path.write_text(text)
    return
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def _read_json(path) -> dict:
  """The JSON object in the file at `path` (an epath.Path); {} if absent or unreadable."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


class SweepError(ValueError):
  """A grid or command line that cannot be swept; the message says why."""


@dataclasses.dataclass(frozen=True)
class Point:
  settings: dict  # Swept key -> value string, in axis order.
  name: str  # Directory name under the root.
  workdir: str


# ------------------------------------------------------------------- the grid


def split_values(text: str) -> list[str]:
  """Splits on commas outside brackets and quotes: '1,(2,3),"a,b"' -> 3 values."""
  values, current, depth, quote = [], [], 0, None
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      values.append(''.join(current))
      current = []
      continue
    current.append(ch)
  if quote or depth:
    raise SweepError(f'Unbalanced brackets or quotes in {text!r}.')
  values.append(''.join(current))
  return values


def parse_setting(spec: str) -> tuple[str, str]:
  """'a.b=value' -> ('a.b', 'value'); the key must be a dotted config path."""
  key, sep, value = spec.partition('=')
  key = key.strip()
  if key.startswith('config.'):
    key = key[len('config.'):]
  if not sep or not _KEY.match(key):
    raise SweepError(f'{spec!r} is not KEY=VALUE with KEY a config path such as '
                     'model.timesteps.')
  return key, value


def parse_axis(spec: str) -> tuple[str, list[str]]:
  """'a.b=v1,v2' -> ('a.b', ['v1', 'v2']); values must be distinct."""
  key, text = parse_setting(spec)
  values = split_values(text)
  if len(set(values)) != len(values):
    raise SweepError(f'Axis {key} repeats a value: {values}.')
  return key, values


def expand_grid(product: list[str], zipped: list[str] = ()) -> list[dict]:
  """Settings of every point: product(product axes..., the zipped group).

  Args:
    product: specs 'KEY=V1,V2,...'; every combination of their values.
    zipped: specs advanced together: point i of the group takes value i of each.
  Returns:
    One {key: value string} per point, keys in the order given, the last product
    axis varying fastest and the zip group innermost.
  """
  axes = [parse_axis(s) for s in product]
  group = [parse_axis(s) for s in zipped]
  keys = [k for k, _ in axes + group]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise SweepError(f'Swept more than once: {", ".join(repeated)}.')
  if group:
    lengths = {k: len(v) for k, v in group}
    if len(set(lengths.values())) > 1:
      raise SweepError('--zip axes need equal numbers of values, got ' + ', '.join(
          f'{k}: {n}' for k, n in lengths.items()) + '.')
    axes.append((None, [dict(zip([k for k, _ in group], vals))
                        for vals in zip(*[v for _, v in group])]))
  points = []
  for combo in itertools.product(*[values for _, values in axes]):
    settings = {}
    for (key, _), value in zip(axes, combo):
      settings.update(value if key is None else {key: value})
    points.append(settings)
  return points


def workdir_name(settings: dict) -> str:
  """A deterministic, filesystem-safe directory name for a point's settings."""
  if not settings:
    return 'base'
  readable = ','.join(f'{k}={settings[k]}' for k in sorted(settings))
  # Commas inside values would make the name ambiguous; '=' in values too.
  parts = [f'{k}={_UNSAFE.sub("_", v.replace("=", "_"))}' for k, v in
           sorted(settings.items())]
  name = ','.join(parts)
  if name != readable or len(name) > _MAX_NAME:
    digest = hashlib.sha1(json.dumps(sorted(settings.items())).encode()).hexdigest()
    name = f'{name[:_MAX_NAME]}-{digest[:10]}'
  return name


def make_points(root: str, grid: list[dict]) -> list[Point]:
  points = [Point(s, workdir_name(s), os.path.join(root, workdir_name(s)))
            for s in grid]
  names = [p.name for p in points]
  if len(set(names)) != len(names):  # Only identical settings can collide.
    raise SweepError('Two points have the same settings.')
  return points


def overrides(settings: dict, fixed: dict) -> list[str]:
  """`--config.KEY=VALUE` arguments: the fixed settings, then the swept ones."""
  return [f'--config.{k}={v}' for k, v in {**fixed, **settings}.items()]


def main_command(python: str, config: str, workdir: str, mode: str,
                 args: list[str]) -> list[str]:
  return [python, '-m', 'vdm_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}'] + args


def load_config(config: str, args: list[str]):
  """The config with the overrides applied, exactly as vdm_jax.main parses them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['sweep', f'--config={config}'] + args
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  try:
    values(argv)
    cfg = values.config
    cfg.training.num_steps  # pylint: disable=pointless-statement
  except (AttributeError, KeyError) as e:
    field = str(e.args[0] if e.args else e).strip('\'"')
    raise SweepError(f"{config} has no field '{field}' (overrides: "
                     f'{shlex.join(args)}).') from e
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'{e} (overrides: {shlex.join(args)}).') from e
  return cfg


# ------------------------------------------------------------------- running


def _log(lock: threading.Lock, message: str) -> None:
  with lock:
    print(message, flush=True)


def is_done(workdir: str, num_steps: int) -> bool:
  """True when eval_results.json exists and was computed at step >= num_steps."""
  try:
    return int(_read_json(_path(workdir) / RESULTS_FILE).get('step', -1)) >= num_steps
  except (TypeError, ValueError):
    return False


def _write_point_file(point: Point, config: str, fixed: dict) -> None:
  folder = _path(point.workdir)
  folder.mkdir(parents=True, exist_ok=True)
  _write_text(folder / POINT_FILE, json.dumps(
      dict(settings=point.settings, fixed=fixed, config=config), indent=2))


def _tail(path: str, lines: int = 15) -> str:
  text = _path(path).read_bytes().decode(errors='replace')
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
      target = _path(log_path)
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


# ------------------------------------------------------------------- the table


def find_points(root: str) -> list[Point]:
  """Every point under root that has a sweep_point.json, in natural order."""
  points, folder = [], _path(root)
  for name in sorted(p.name for p in folder.iterdir()) if folder.is_dir() else ():
    path = folder / name / POINT_FILE
    if path.exists():
      points.append(Point(json.loads(path.read_text())['settings'], name,
                          os.path.join(root, name)))

  def natural(value):
    try:
      return (0, float(value), '')
    except (TypeError, ValueError):
      return (1, 0.0, str(value))
  keys = _setting_keys(points)
  return sorted(points, key=lambda p: [natural(p.settings.get(k)) for k in keys])


def _setting_keys(points: list[Point]) -> list[str]:
  keys = []
  for p in points:
    keys += [k for k in p.settings if k not in keys]
  return keys


def collect(points: list[Point]) -> tuple[list[str], list[dict]]:
  """(columns, rows): the swept settings and each point's results (None if absent)."""
  rows, discrete = [], []
  for p in points:
    row = dict(p.settings)
    results = _read_json(_path(p.workdir) / RESULTS_FILE)
    for k in RESULT_COLUMNS:
      row[k] = results.get(k)
    for t, v in (results.get('discrete') or {}).items():
      row[f'bpd_T{t}'] = v
      if f'bpd_T{t}' not in discrete:
        discrete.append(f'bpd_T{t}')
    rows.append(row)
  discrete.sort(key=lambda c: int(c[5:]) if c[5:].isdigit() else 0)
  return _setting_keys(points) + list(RESULT_COLUMNS) + discrete, rows


def _cell(value, precise: bool) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    return repr(value) if precise else f'{value:.4f}'
  return str(value)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
  def line(cells):
    return '| ' + ' | '.join(c.replace('|', r'\|') for c in cells) + ' |'
  out = [line(columns), '|' + '|'.join('---' for _ in columns) + '|']
  out += [line([_cell(r.get(c), False) for c in columns]) for r in rows]
  return '\n'.join(out) + '\n'


def csv_table(columns: list[str], rows: list[dict]) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(columns)
  for r in rows:
    writer.writerow([_cell(r.get(c), True) for c in columns])
  return buf.getvalue()


def write_tables(root: str, points: list[Point]) -> str:
  """Writes ROOT/results.md and ROOT/results.csv; returns the Markdown."""
  columns, rows = collect(points)
  md = markdown_table(columns, rows)
  folder = _path(root)
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in (('results.md', md), ('results.csv', csv_table(columns, rows))):
    _write_text(folder / name, text)
  return md


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


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
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
