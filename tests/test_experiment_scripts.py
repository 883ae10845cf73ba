"""The scripts of experiments/ that have no test file of their own, each run end to end
as a user runs it, on the test config's trained model: codec_eval.py, codec_sizes.py,
codec_benchmark.py and interleave.py."""

import json
import math
import shutil
import subprocess
import sys

import pytest

import common

pytestmark = pytest.mark.slow  # each test runs scripts end to end

CONFIG = 'configs/test.py'
TIMESTEPS = 20  # T of the codec runs: few network passes, every code path.


@pytest.fixture(scope='module')
def codec_scripts(trained_test_workdir, tmp_path_factory):
  """(workdir, output folder, CompletedProcess per script) of the three codec scripts."""
  out = tmp_path_factory.mktemp('scripts')
  workdir = out / 'workdir'
  shutil.copytree(trained_test_workdir, workdir)
  common_flags = (f'--config={CONFIG}', f'--workdir={workdir}')
  done = common.run_commands(
      ('experiments/codec_eval.py', *common_flags, f'--timesteps={TIMESTEPS}',
       '--num_images=4', '--bound_draws=2', '--config.codec.step_placement=rate'),
      ('experiments/codec_sizes.py', *common_flags, f'--config.codec.timesteps={TIMESTEPS}',
       '--num_images=1,3', '--designs=file,bits-back', f'--output={out}/sizes.json'),
      ('experiments/codec_benchmark.py', *common_flags, f'--timesteps={TIMESTEPS}',
       '--num_images=4', f'--out={out}/benchmark.json'))
  for d in done:
    assert d.returncode == 0, d.stderr[-3000:]
  return workdir, out, done


def test_codec_eval_reports_a_file_at_its_bound(codec_scripts):
  workdir, _, done = codec_scripts
  r = json.loads((workdir / 'codec_eval.json').read_text())
  dims = math.prod(r['image_shape'])
  assert r['num_images'] == 4 and r['timesteps'] == TIMESTEPS
  assert r['step_placement'] == 'rate'  # the bound below is at the file's placed levels
  assert r['file_bpd'] == pytest.approx(8 * r['file_bytes'] / (4 * dims))
  # The file is the net stream, the initial bits it borrowed and the header; the stack
  # is stored in whole 32-bit words, its valid bits counted exactly.
  assert r['file_bpd'] * 4 * dims == pytest.approx(
      r['net_bpd'] * 4 * dims + 8 * r['header_bytes'] + r['initial_bits'], abs=32)
  # The net stream is the images' information content under the coded (discretised)
  # models plus the entropy coder's overhead, a few bits for the whole file (ANS).
  assert abs(r['coder_overhead_bits']) < 64
  assert r['net_minus_bound_percent'] == pytest.approx(
      100 * r['net_minus_bound_bpd'] / r['bound_bpd'])
  table = json.loads((workdir / 'compression.json').read_text())
  assert table and 'codec_eval.json' not in done[0].stderr
  assert 'bpd' in done[0].stdout


def test_codec_sizes_never_exceed_the_best_conventional_code_by_more_than_a_header(
    codec_scripts):
  _, out, done = codec_scripts
  rows = json.loads((out / 'sizes.json').read_text())
  assert [(r['num_images'], r['design']) for r in rows] == [
      (1, 'file'), (1, 'bits-back'), (3, 'file'), (3, 'bits-back')]
  for r in rows:
    assert r['bpd'] == pytest.approx(8 * r['bytes'] / (r['num_images'] * 64))
    refs = r['references']
    assert set(refs) == {'JPEG XL lossless', 'WebP lossless', 'PNG'}
    assert r['best_conventional_bytes'] == min(min(x['per_image_bytes'],
                                                   x['one_picture_bytes']) for x in refs.values())
    if r['design'] == 'file':
      # The file keeps the better of bits-back and the conventional code.
      assert r['over_best_bytes'] <= r['header_bytes'] <= 64, r
  assert '| 3 | file |' in done[1].stdout and 'JPEG XL lossless bpd' in done[1].stdout


def test_codec_benchmark_splits_each_pass_into_shares_that_sum_to_one(codec_scripts):
  _, out, done = codec_scripts
  r = json.loads((out / 'benchmark.json').read_text())
  assert r['num_images'] == 4 and r['timesteps'] == TIMESTEPS
  for name in ('encode', 'decode'):
    x = r[name]
    assert x['images_per_second'] == pytest.approx(4 / x['seconds'])
    shares = [x['network_share'], x['coding_share'], x['other_share']]
    assert sum(shares) == pytest.approx(1.0)
    assert all(0 <= s <= 1 for s in shares[:2]), x
  assert '| encode |' in done[2].stdout


def test_interleave_alternates_two_trees_and_reports_their_ratio(tmp_path):
  if not (common.REPO / '.git').exists():
    pytest.skip('interleave.py compares git commits; this is not a git checkout')
  out = tmp_path / 'runs.json'
  worktrees_before = _worktrees()
  done = subprocess.run(
      [sys.executable, 'experiments/interleave.py', '--base=HEAD', '--runs=1',
       f'--out={out}', '--', f'--config={CONFIG}', '--skip_sampler', '--skip_eval',
       '--repeats=1', '--matmul_size=128'],
      cwd=common.REPO, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['base'] == 'HEAD' and r['head'] != 'HEAD'
  assert sorted(r['runs']) == sorted([r['base'], r['head']])
  assert set(r['summary']) == {'train_ms'}  # the evaluation pass was skipped
  for key in ('train_ms',):
    s = r['summary'][key]
    assert all(len(v) == 1 for v in s['values'].values())
    base, head = s['best'][r['base']], s['best'][r['head']]
    speedup = base / head if key == 'train_ms' else head / base
    assert s['speedup_best'] == pytest.approx(speedup)
  assert 'train_ms: best' in done.stdout
  assert _worktrees() == worktrees_before  # the base's worktree is removed again


def _worktrees() -> list[str]:
  """The paths of the repository's worktrees."""
  listing = subprocess.run(['git', 'worktree', 'list', '--porcelain'], cwd=common.REPO,
                           capture_output=True, text=True, check=True).stdout
  return [line.split(' ', 1)[1] for line in listing.splitlines()
          if line.startswith('worktree ')]
