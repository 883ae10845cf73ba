"""Tests of vdm_jax.evaluation.evaluate: the bound over a split, its standard error, its JSON."""

import math

import jax
import numpy as np

import common
from vdm_jax import build
from vdm_jax.data import datasets
from vdm_jax.evaluation import evaluate
from vdm_jax.runtime import workdir as workdir_lib


def _run(num_examples, batch_size, num_draws=1):
  cfg = common.load_config('test')
  cfg.eval.num_examples, cfg.eval.batch_size, cfg.eval.num_draws = (num_examples,
                                                                     batch_size, num_draws)
  run = build.build(cfg)
  params = common.perturb(run.init_state().params, jax.random.key(1))
  return cfg, run, params


def test_mean_and_standard_error_are_those_of_the_per_image_bounds():
  """One batch: recompute each image's bpd with the evaluator's draws."""
  cfg, run, params = _run(num_examples=10, batch_size=16, num_draws=2)
  results = evaluate.evaluate(run.model, params, cfg, run.mesh)
  images = np.zeros((16, 8, 8, 1), np.uint8)
  images[:10] = datasets.load_split(cfg.data, 'test')[:10]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 0x5EED), 0)
  per_image = np.mean([run.model.apply(
      {'params': params}, images, np.zeros(16), deterministic=True,
      rngs={'sample': jax.random.fold_in(key, d)}).bpd for d in range(2)], axis=0)[:10]
  assert results['num_examples'] == 10 and results['num_draws'] == 2
  np.testing.assert_allclose(results['bpd'], per_image.mean(), rtol=1e-5)
  np.testing.assert_allclose(results['bpd_stderr'],
                             per_image.std(ddof=1) / math.sqrt(10), rtol=1e-4)
  terms = results['bpd_recon'] + results['bpd_prior'] + results['bpd_diff']
  np.testing.assert_allclose(terms, results['bpd'], rtol=1e-5)


def test_discrete_bounds_are_reported_beside_the_models_own():
  """The T = 10 entry is the bound of the same parameters as a T = 10 model."""
  cfg, run, params = _run(num_examples=20, batch_size=8)
  results = evaluate.evaluate(run.model, params, cfg, run.mesh, timesteps_list=(None, 10))
  assert results['timesteps'] == 0 and set(results['discrete']) == {'10'}
  cfg.model.timesteps = 10
  as_t10 = evaluate.evaluate(build.build(cfg).model, params, cfg, run.mesh)
  assert as_t10['timesteps'] == 10
  assert results['discrete']['10'] == as_t10['bpd']
  assert results['discrete_stderr']['10'] == as_t10['bpd_stderr']


def test_evaluate_and_write_puts_the_results_in_the_workdir(tmp_path):
  cfg, run, _ = _run(num_examples=8, batch_size=8)
  state = run.init_state()
  results = evaluate.evaluate_and_write(run, state, workdir_lib.Workdir(tmp_path))
  saved = workdir_lib.Workdir(tmp_path).read_results(0)
  assert saved == dict(results, step=0) and saved['params'] == 'ema'
