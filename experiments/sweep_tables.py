"""A sweep's results: every point's eval_results.json in one Markdown and CSV table."""

import csv
import io
import json
import math
import os

import sweep_files
from sweep_grid import Point
from sweep_grid import POINT_FILE

RESULTS_FILE = 'eval_results.json'  # What vdm_jax.main --mode=eval writes.
RESULT_COLUMNS = ('bpd', 'bpd_stderr', 'bpd_recon', 'bpd_prior', 'bpd_diff', 'step')



def find_points(root: str) -> list[Point]:
  """Every point under root that has a sweep_point.json, in natural order."""
  points, folder = [], sweep_files.path(root)
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
  keys = setting_keys(points)
  return sorted(points, key=lambda p: [natural(p.settings.get(k)) for k in keys])


def setting_keys(points: list[Point]) -> list[str]:
  keys = []
  for p in points:
    keys += [k for k in p.settings if k not in keys]
  return keys


def collect(points: list[Point]) -> tuple[list[str], list[dict]]:
  """(columns, rows): the swept settings and each point's results (None if absent)."""
  rows, discrete = [], []
  for p in points:
    row = dict(p.settings)
    results = sweep_files.read_json(sweep_files.path(p.workdir) / RESULTS_FILE)
    for k in RESULT_COLUMNS:
      row[k] = results.get(k)
    for t, v in (results.get('discrete') or {}).items():
      row[f'bpd_T{t}'] = v
      if f'bpd_T{t}' not in discrete:
        discrete.append(f'bpd_T{t}')
    rows.append(row)
  discrete.sort(key=lambda c: int(c[5:]) if c[5:].isdigit() else 0)
  return setting_keys(points) + list(RESULT_COLUMNS) + discrete, rows


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
  folder = sweep_files.path(root)
  folder.mkdir(parents=True, exist_ok=True)
  for name, text in (('results.md', md), ('results.csv', csv_table(columns, rows))):
    sweep_files.write_text(folder / name, text)
  return md
