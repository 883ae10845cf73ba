"""--mode=phema: the post-hoc EMA chosen on validation data, and used by evaluation."""

import json
import shutil

import jax
import numpy as np
import pytest

import common
from vdm_jax import build
from vdm_jax.evaluation import evaluate
from vdm_jax.evaluation import posthoc_ema
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import train
from vdm_jax import validation

EPS32 = float(np.finfo(np.float32).eps)


def _config(**data):
  cfg = common.load_config('test')
  cfg.phema.snapshot_every = 2
  cfg.phema.candidates = (0.05, 0.1, 0.2)
  cfg.data.update(data)
  return cfg


@pytest.fixture(scope='module')
def held_out_run(tmp_path_factory):
  """configs/test.py trained with 64 training images held out, snapshots at 2, 4, 6."""
  cfg = _config(validation_size=64)
  workdir = tmp_path_factory.mktemp('held_out') / 'workdir'
  final = train.train_and_evaluate(cfg, str(workdir))
  return cfg, workdir, jax.tree.map(np.asarray, jax.device_get(final))


@pytest.mark.slow
def test_the_curve_is_written_and_its_choice_is_what_eval_uses(held_out_run):
  cfg, workdir, final = held_out_run
  results = posthoc_ema.select_workdir(cfg, str(workdir))
  assert (results['phema_step'], results['phema_snapshots'], results['num_examples']) == (6, 3, 64)
  curve = results['curve']
  assert [c['sigma_rel'] for c in curve] == [0.05, 0.1, 0.2]
  assert results['chosen_sigma_rel'] == min(curve, key=lambda c: c['bpd'])['sigma_rel']
  for c in curve:  # the paired difference is the difference of the means
    assert c['minus_ema'] == pytest.approx(c['bpd'] - results['ema_bpd'], abs=1e-9)
  saved = json.loads((workdir / posthoc_ema.RESULTS_FILE).read_text())
  assert saved['curve'] == curve and saved['params'] == results['params']
  assert (workdir / posthoc_ema.PLOT_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert 'chosen' in posthoc_ema.summary(results)

  # eval.phema_sigma_rel = a tracked σ_rel: that profile, to float32 rounding, named.
  chosen = cfg.copy_and_resolve_references()
  chosen.eval.phema_sigma_rel = 0.1
  _, state = build.restore(chosen, str(workdir))
  for got, tracked in zip(jax.tree.leaves(state.ema_params),
                          jax.tree.leaves(jax.tree.map(lambda p: p[1], final.phema))):
    np.testing.assert_allclose(got, tracked, rtol=0, atol=4 * EPS32 * np.abs(tracked).max())
  evaluated = evaluate.evaluate_workdir(chosen, str(workdir))
  assert evaluated['params'] == 'phema_sigma_rel=0.1'
  assert json.loads((workdir / 'eval_results.json').read_text())['params'] == evaluated['params']

  # experiments/phema_paired.py: the chosen σ_rel against the EMA on the test split, paired.
  paired = common.load_experiment('phema_paired.py').compare(cfg, str(workdir))
  assert paired['sigma_rel'] == results['chosen_sigma_rel'] and paired['num_examples'] == 100
  assert paired['difference'][0] == pytest.approx(paired['phema'][0] - paired['ema'][0],
                                                  abs=1e-9)
  assert json.loads((workdir / 'phema_test.json').read_text())['sigma_rel'] == paired['sigma_rel']


@pytest.fixture
def trained_on_all(trained_test_workdir, tmp_path):
  shutil.copytree(trained_test_workdir, tmp_path / 'w')
  return tmp_path / 'w'


def test_a_validation_split_the_run_trained_on_is_refused(trained_on_all):
  before = sorted(p.name for p in trained_on_all.iterdir())
  with pytest.raises(validation.ConfigError, match='trained on the first 1500 .* overlap'):
    posthoc_ema.select_workdir(_config(validation_size=100), str(trained_on_all))
  with pytest.raises(validation.ConfigError, match='data.validation_size'):
    posthoc_ema.select_workdir(_config(), str(trained_on_all))
  assert sorted(p.name for p in trained_on_all.iterdir()) == before


def test_a_post_hoc_ema_without_snapshots_says_so(trained_on_all):
  cfg = _config()
  cfg.eval.phema_sigma_rel = 0.05
  shutil.rmtree(trained_on_all / workdir_lib.PHEMA_DIR)
  with pytest.raises(workdir_lib.WorkdirError, match='No snapshot of the EMA profiles'):
    build.restore(cfg, str(trained_on_all))
