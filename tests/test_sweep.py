"""experiments/sweep.py and its sweep_grid.py, sweep_tables.py: grid expansion, workdir
names, tables, one real sweep."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest

import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sweep = common.load_experiment('sweep.py')
sweep_grid = common.load_experiment('sweep_grid.py')
sweep_tables = common.load_experiment('sweep_tables.py')


def test_split_values_keeps_brackets_and_quotes():
  assert sweep_grid.split_values('1,2') == ['1', '2']
  assert sweep_grid.split_values('(10,100),(1000,)') == ['(10,100)', '(1000,)']
  assert sweep_grid.split_values('"a,b",[1,2],c') == ['"a,b"', '[1,2]', 'c']
  with pytest.raises(sweep_grid.SweepError, match='Unbalanced'):
    sweep_grid.split_values('(1,2')


def test_product_is_cartesian_last_axis_fastest():
  grid = sweep_grid.expand_grid(['model.timesteps=0,10', 'optimizer.learning_rate=1e-3,3e-3'])
  assert grid == [
      {'model.timesteps': '0', 'optimizer.learning_rate': '1e-3'},
      {'model.timesteps': '0', 'optimizer.learning_rate': '3e-3'},
      {'model.timesteps': '10', 'optimizer.learning_rate': '1e-3'},
      {'model.timesteps': '10', 'optimizer.learning_rate': '3e-3'},
  ]


def test_zip_pairs_elementwise_inside_the_product():
  grid = sweep_grid.expand_grid(['seed=0,1'], ['a.b=1,2', 'config.c=x,y'])
  assert grid == [
      {'seed': '0', 'a.b': '1', 'c': 'x'}, {'seed': '0', 'a.b': '2', 'c': 'y'},
      {'seed': '1', 'a.b': '1', 'c': 'x'}, {'seed': '1', 'a.b': '2', 'c': 'y'},
  ]
  assert sweep_grid.expand_grid([], ['a=1,2', 'b=3,4']) == [{'a': '1', 'b': '3'},
                                                     {'a': '2', 'b': '4'}]
  assert sweep_grid.expand_grid([]) == [{}]


@pytest.mark.parametrize('product, zipped, message', [
    ([], ['a=1,2', 'b=3'], 'equal numbers of values, got a: 2, b: 1'),
    (['a=1,2'], ['a=3,4'], 'Swept more than once: a'),
    (['a=1,1'], [], 'repeats a value'),
    (['a'], [], 'is not KEY=VALUE'),
    (['a b=1'], [], 'is not KEY=VALUE'),
])
def test_bad_grids_are_clear_errors(product, zipped, message):
  with pytest.raises(sweep_grid.SweepError, match=re.escape(message)):
    sweep_grid.expand_grid(product, zipped)


def test_workdir_names_are_deterministic_and_safe():
  a = {'optimizer.learning_rate': '1e-3', 'model.timesteps': '10'}
  b = {'model.timesteps': '10', 'optimizer.learning_rate': '1e-3'}
  assert sweep_grid.workdir_name(a) == sweep_grid.workdir_name(b) == (
      'model.timesteps=10,optimizer.learning_rate=1e-3')
  assert sweep_grid.workdir_name({}) == 'base'
  odd = [{'data.npz_path': '/data/x y.npz'}, {'data.npz_path': '/data/x_y.npz'},
         {'e.t': '(10,100)'}, {'e.t': '(10_100)'}, {'s': "'a=b'"}, {'s': 'a' * 400}]
  names = [sweep_grid.workdir_name(s) for s in odd]
  assert len(set(names)) == len(names)
  for name in names:
    assert re.fullmatch(r'[A-Za-z0-9._+=,-]+', name) and len(name) < 200, name
  assert names == [sweep_grid.workdir_name(s) for s in odd]


def test_overrides_and_commands_pass_values_verbatim():
  args = sweep_grid.overrides({'eval.discrete_timesteps': '(10,100)'},
                         {'training.num_steps': '20'})
  assert args == ['--config.training.num_steps=20',
                  '--config.eval.discrete_timesteps=(10,100)']
  cmd = sweep_grid.main_command('py', 'configs/test.py', 'r/p', 'eval', args)
  assert cmd[:6] == ['py', '-m', 'vdm_jax.main', '--config=configs/test.py',
                     '--workdir=r/p', '--mode=eval']


def test_overrides_are_checked_against_the_config():
  cfg = sweep_grid.load_config(os.path.join(REPO, 'configs/test.py'),
                          ['--config.model.timesteps=10',
                           '--config.eval.discrete_timesteps=(10,100)'])
  assert cfg.model.timesteps == 10 and tuple(cfg.eval.discrete_timesteps) == (10, 100)
  with pytest.raises(sweep_grid.SweepError, match="no field 'typo'"):
    sweep_grid.load_config(os.path.join(REPO, 'configs/test.py'), ['--config.model.typo=1'])
  with pytest.raises(sweep_grid.SweepError, match='abc'):
    sweep_grid.load_config(os.path.join(REPO, 'configs/test.py'),
                      ['--config.model.timesteps=abc'])


def _fake_point(root, settings, results=None):
  point = sweep_grid.make_points(str(root), [settings])[0]
  sweep._write_point_file(point, 'configs/test.py', {})  # pylint: disable=protected-access
  if results is not None:
    with open(os.path.join(point.workdir, 'eval_results.json'), 'w') as f:
      json.dump(results, f)
  return point


def test_tables_collect_results_and_leave_missing_ones_empty(tmp_path):
  results = dict(bpd=3.25, bpd_stderr=0.05, bpd_recon=0.01, bpd_prior=0.001,
                 bpd_diff=3.239, step=100, num_examples=16, discrete={'10': 3.5})
  points = [_fake_point(tmp_path, {'model.timesteps': '10'}, results),
            _fake_point(tmp_path, {'model.timesteps': '2'})]
  md = sweep_tables.write_tables(str(tmp_path), points)
  assert md == (tmp_path / 'results.md').read_text()
  lines = md.splitlines()
  assert lines[0] == ('| model.timesteps | bpd | bpd_stderr | bpd_recon | bpd_prior | '
                      'bpd_diff | step | bpd_T10 |')
  assert lines[2] == '| 10 | 3.2500 | 0.0500 | 0.0100 | 0.0010 | 3.2390 | 100 | 3.5000 |'
  assert lines[3] == '| 2 |  |  |  |  |  |  |  |'
  with open(tmp_path / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert rows[0]['model.timesteps'] == '10' and float(rows[0]['bpd']) == 3.25
  assert rows[1]['bpd'] == '' and rows[1]['step'] == ''
  # --collect finds the points by their sweep_point.json, in natural order (2 < 10).
  assert [p.name for p in sweep_tables.find_points(str(tmp_path))] == [
      'model.timesteps=2', 'model.timesteps=10']
  assert sweep.main(['--collect', f'--root={tmp_path}']) == 0


def test_finished_points_are_recognised(tmp_path):
  point = _fake_point(tmp_path, {'seed': '1'}, dict(bpd=1.0, step=20))
  assert sweep.is_done(point.workdir, 20)
  assert not sweep.is_done(point.workdir, 40)
  assert not sweep.is_done(str(tmp_path / 'nowhere'), 1)


def test_print_mode_writes_one_command_per_point(tmp_path, capsys):
  out = tmp_path / 'jobs.txt'
  rc = sweep.main([f'--config={REPO}/configs/test.py', f'--root={tmp_path}/r',
                   '--product', 'model.timesteps=0,10', '--zip', 'seed=1,2',
                   '--zip', 'eval.discrete_timesteps=(10,),(100,)',
                   '--set', 'training.num_steps=2', '--mode=print', f'--out={out}'])
  assert rc == 0
  lines = out.read_text().splitlines()
  assert len(lines) == 4
  assert all(line.count('vdm_jax.main') == 2 and ' && ' in line for line in lines)
  assert "'--config.eval.discrete_timesteps=(100,)'" in lines[1]
  assert capsys.readouterr().out == ''  # The commands went to --out.
  rc = sweep.main([f'--config={REPO}/configs/test.py', f'--root={tmp_path}/r',
                   '--product', 'model.timesteps=0', '--set', 'model.timesteps=1'])
  assert rc == 2


def test_a_root_that_cannot_hold_the_sweep_is_a_message(tmp_path, capsys, gcs_bucket):
  (tmp_path / 'file').write_text('')
  grid = [f'--config={REPO}/configs/test.py', '--product', 'model.timesteps=0',
          '--mode=print']
  for root, expected in ((tmp_path / 'file' / 'r', f'--root={tmp_path / "file" / "r"}: '
                          f'{tmp_path / "file"} is a file, not a folder; choose another'),
                         ('gs://no-such-bucket/r', '--root=gs://no-such-bucket/r: the bucket '
                          'gs://no-such-bucket does not exist. Create it')):
    for mode in ([], ['--collect']):
      assert sweep.main(grid + [f'--root={root}'] + mode) == 2
      assert f'error: {expected}' in capsys.readouterr().err
  assert os.listdir(tmp_path) == ['file']
  assert sweep.main(grid + [f'--root={gcs_bucket}/sweep']) == 0


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
  """Two points of configs/test.py, trained 2 steps and evaluated, two at a time."""
  root = tmp_path / 'sweep'
  cmd = [sys.executable, 'experiments/sweep.py', '--config=configs/test.py',
         f'--root={root}', '--product', 'model.timesteps=0,10', '--jobs=2']
  for s in ('training.num_steps=2', 'training.steps_per_call=1', 'training.log_every=1',
            'training.checkpoint_every=2', 'eval.num_examples=16', 'eval.batch_size=16'):
    cmd += ['--set', s]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  md = (root / 'results.md').read_text().splitlines()
  assert md[0].startswith('| model.timesteps | bpd | bpd_stderr |')
  assert [line.split('|')[1].strip() for line in md[2:]] == ['0', '10']
  with open(root / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['model.timesteps'] for r in rows] == ['0', '10']
  for r in rows:
    assert math.isfinite(float(r['bpd'])) and float(r['bpd']) > 0
    assert r['step'] == '2'
  # Run again: both points are finished, so nothing is recomputed.
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
  assert again.returncode == 0 and again.stdout.count('skipped') == 2, again.stdout
