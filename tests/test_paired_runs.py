"""experiments/paired_runs.py: paired bounds, estimator variance and the figure of runs."""

import json
import os

import numpy as np
import pytest

import common
from vdm_jax.training import train

paired_runs = common.load_experiment('paired_runs.py')


@pytest.mark.slow
def test_runs_are_compared_with_their_reference_image_by_image(tmp_path):
  """Two tiny runs trained in process, laid out as sweep.py lays them out."""
  for sampling in ('antithetic', 'sigmoid'):
    settings = {'model.time_sampling': sampling}
    overrides = {'training.num_steps': '4', 'training.eval_every': '2',
                 'eval.num_examples': '24', 'eval.num_draws': '2'}
    workdir = tmp_path / f'model.time_sampling={sampling}'
    workdir.mkdir()
    (workdir / 'sweep_point.json').write_text(json.dumps(
        dict(settings=settings, fixed=overrides,
             config=str(common.REPO / 'configs' / 'test.py'))))
    config = common.load_config('test')
    config.model.time_sampling = sampling
    for key, value in overrides.items():
      section, field = key.split('.')
      config[section][field] = int(value)
    train.train_and_evaluate(config, str(workdir))
  figure = tmp_path / 'bound.png'
  assert paired_runs.main([f'--root={tmp_path}', '--variance_draws=4',
                           '--reference=model.time_sampling=antithetic',
                           f'--figure={figure}']) == 0
  rows = {r['settings']['model.time_sampling']: r
          for r in json.loads((tmp_path / 'paired.json').read_text())}
  assert rows['antithetic']['diff'] == 0.0 and rows['antithetic']['diff_stderr'] == 0.0
  assert np.isfinite(rows['sigmoid']['diff']) and rows['sigmoid']['diff_stderr'] > 0
  for row in rows.values():
    assert row['step'] == 4 and row['var_diff'] > 0 and np.isfinite(row['bpd'])
    # configs/test.py trains the bound itself (weighting 'elbo'): w ≡ 1.
    assert row['var_weighted'] == pytest.approx(row['var_diff'], rel=1e-6)
    assert row['curve'][0] == [2]  # the bound written during training (not at the end)
  assert 'paired diff' in (tmp_path / 'paired.md').read_text()
  assert figure.stat().st_size > 1000
