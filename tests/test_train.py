"""Training end to end: resume, devices, evaluation coverage, CLI, tfds (several processes:
tests/test_reliability.py)."""

import json
import math
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import common
from vdm_jax import build
from vdm_jax.data import datasets
from vdm_jax.evaluation import evaluate
from vdm_jax.evaluation import sampling
from vdm_jax.training import optim
from vdm_jax.training import train


def _test_config(**training):
  cfg = common.load_config('test')
  cfg.training.update(training)
  return cfg


@pytest.fixture(scope='module')
def reference_run(trained_test_workdir):
  """(config, workdir, final state) of the uninterrupted 6-step run of configs/test.py
  on 1 device (tests/conftest.py; copy the workdir before changing it)."""
  cfg = _test_config()
  _, state = build.restore(cfg, str(trained_test_workdir))
  return cfg, trained_test_workdir, jax.tree.map(np.asarray, jax.device_get(state))


def test_next_boundary_stops_at_every_event():
  cfg = _test_config(num_steps=25, steps_per_call=4, log_every=6, checkpoint_every=10,
                     eval_every=0, sample_every=0)
  stops, step = [], 0
  while step < 25:
    step = train.next_boundary(step, cfg)
    stops.append(step)
  assert stops == [4, 6, 8, 10, 12, 16, 18, 20, 24, 25]


def test_ema_warmup_rate():
  cfg = _test_config().optimizer
  cfg.ema_rate = 0.999
  assert float(optim.ema_rate(cfg, np.int32(0))) == pytest.approx(0.1)
  assert float(optim.ema_rate(cfg, np.int32(10**6))) == pytest.approx(0.999)
  cfg.ema_warmup = False
  assert float(optim.ema_rate(cfg, np.int32(0))) == pytest.approx(0.999)


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(reference_run, tmp_path):
  cfg, _, full = reference_run
  train.train_and_evaluate(_test_config(num_steps=2), str(tmp_path))  # stops at 2
  resumed = train.train_and_evaluate(cfg, str(tmp_path))  # same command: resumes
  assert int(resumed.step) == 6
  common.assert_trees_equal(jax.device_get(resumed), full)
  again = train.train_and_evaluate(cfg, str(tmp_path))  # finished: nothing more to do
  common.assert_trees_equal(jax.device_get(again), full)


_MULTI_DEVICE = r'''
import json, jax, numpy as np, common
from vdm_jax import build
from vdm_jax.data import input_pipeline
from vdm_jax.evaluation import evaluate
from vdm_jax.runtime import parallel
from vdm_jax.training import train
cfg = common.load_config('test')
cfg.model.time_sampling = 'adaptive'  # its state is all-reduced over the global batch
cfg.model.second_order_weight = 0.1  # one more probe draw and a forward-mode pass
out = {}
for name, devices in (('1', jax.devices()[:1]), ('8', jax.devices())):
  mesh = parallel.make_mesh(devices)
  run = build.build(cfg, mesh)
  info, model, tx = run.info, run.model, run.tx
  if name == '1':
    initial = jax.device_get(run.init_state())
  state = jax.device_put(initial, parallel.replicated(mesh))  # one init, compiled once
  call = train.make_train_call(model, tx, cfg, mesh)
  batch = next(input_pipeline.train_batches(cfg.data, global_batch_size=8, seed=0))
  gb = {k: parallel.global_array(mesh, v[None], 1) for k, v in batch.items()}
  state, metrics = call(state, gb)
  out[name] = dict(loss=float(metrics['loss'][0]), bpd=float(metrics['bpd'][0]),
                   kernel=np.asarray(state.params['score_model']['conv_in']['kernel']).ravel()[:50].tolist(),
                   profiles=np.asarray(state.phema['score_model']['conv_in']['kernel']).reshape(2, -1)[:, :50].tolist(),
                   bins=np.asarray(state.time_sampler.mean_loss).tolist(),
                   updates=np.asarray(state.time_sampler.updates).tolist(),
                   evals={})
  for batch_size, num in ((24, None), (16, 7)):
    cfg.eval.batch_size, cfg.eval.num_examples = batch_size, num
    r = evaluate.evaluate(model, state.params, cfg, mesh)
    out[name]['evals'][f'{batch_size}/{num}'] = [r['num_examples'], r['bpd']]
cfg.eval.batch_size, cfg.eval.num_examples = 64, 100
mulan = common.load_config('test')  # a schedule per sub-pixel with its latent, t-proposal
mulan.model.update(schedule='mulan', mulan_latent_draws=3, mulan_latent_classes=5,
                   time_sampling='adaptive')
for name, devices in (('mulan1', jax.devices()[:1]), ('mulan8', jax.devices())):
  mesh = parallel.make_mesh(devices)
  run = build.build(mulan, mesh)
  if name == 'mulan1':
    initial = jax.device_get(run.init_state())
  state = jax.device_put(initial, parallel.replicated(mesh))
  batch = next(input_pipeline.train_batches(mulan.data, global_batch_size=8, seed=0))
  gb = {k: parallel.global_array(mesh, v[None], 1) for k, v in batch.items()}
  state, metrics = train.make_train_call(run.model, run.tx, mulan, mesh)(state, gb)
  out[name] = dict(loss=float(metrics['loss'][0]),
                   latent=float(metrics['bpd_latent'][0]),
                   coefficients=np.asarray(
                       state.params['gamma']['coefficients']['dense_out']['kernel']
                   ).ravel()[:50].tolist(),
                   bins=np.asarray(state.time_sampler.mean_loss).tolist())
cfg.model.time_sampling = 'antithetic'  # the settings of reference_run
cfg.model.second_order_weight = 0.0
final = train.train_and_evaluate(cfg, WORKDIR)
np.savez(WORKDIR + '/final_params.npz', *[np.asarray(x) for x in jax.tree.leaves(final.params)])
np.savez(WORKDIR + '/final_profiles.npz', *[np.asarray(x) for x in jax.tree.leaves(final.phema)])
print('RESULT' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """One subprocess with 8 CPU devices: a step on 1 and 8 devices, evals, a checkpoint."""
  workdir = tmp_path_factory.mktemp('eight')
  proc = common.run_python(f'WORKDIR = {str(workdir)!r}\n' + _MULTI_DEVICE, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')][-1]
  return json.loads(line[len('RESULT'):]), workdir


@pytest.mark.slow
def test_one_step_same_on_1_and_8_devices(eight_devices):
  out, _ = eight_devices
  # The global batch, its antithetic times and every draw are the same; only the
  # reduction order differs: float32 rounding.
  assert out['8']['loss'] == pytest.approx(out['1']['loss'], rel=1e-5)
  np.testing.assert_allclose(out['8']['kernel'], out['1']['kernel'], rtol=1e-4, atol=1e-6)
  # The EMA profiles (docs/maths.md §14) after step 1 are the parameters: β_1 = 0.
  for profile in (0, 1):
    assert out['1']['profiles'][profile] == out['1']['kernel']
    np.testing.assert_allclose(out['8']['profiles'][profile], out['8']['kernel'], rtol=0)
  # The adaptive proposal's bins: the same global batch's integrands, all-reduced.
  assert out['8']['updates'] == out['1']['updates'] and sum(out['1']['updates']) > 0
  np.testing.assert_allclose(out['8']['bins'], out['1']['bins'], rtol=1e-5)
  # The mulan schedule (docs/maths.md §13): latent draws and t-proposal over the global batch.
  assert out['mulan8']['loss'] == pytest.approx(out['mulan1']['loss'], rel=1e-5)
  assert out['mulan8']['latent'] == pytest.approx(out['mulan1']['latent'], rel=1e-4)
  np.testing.assert_allclose(out['mulan8']['coefficients'], out['mulan1']['coefficients'],
                             rtol=1e-4, atol=1e-7)
  assert max(out['mulan1']['bins']) > 0  # the t-proposal's bins were updated
  np.testing.assert_allclose(out['mulan8']['bins'], out['mulan1']['bins'], rtol=1e-5)


@pytest.mark.slow
def test_eval_counts_every_image_once(eight_devices):
  out, _ = eight_devices
  num_test = datasets.dataset_info(common.load_config('test').data).num_test
  expected = {'24/None': num_test, '16/7': 7}
  for devices in ('1', '8'):
    for key, n in expected.items():
      assert out[devices]['evals'][key][0] == n, (devices, key)
  for key in expected:  # same batches, same draws: the same bound on 1 and 8 devices
    assert out['8']['evals'][key][1] == pytest.approx(out['1']['evals'][key][1], rel=1e-5)


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_1(eight_devices, reference_run):
  _, workdir = eight_devices
  cfg, _, full = reference_run
  params = common.params_of(workdir, cfg)  # this process has 1 device
  assert len(jax.devices()) == 1
  saved = np.load(workdir / 'final_params.npz')
  written = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  common.assert_trees_equal(jax.tree.leaves(params), written)  # bit for bit
  # …and the 8-device run trained like the 1-device one (see common.assert_params_close_across_reduction_orders).
  common.assert_params_close_across_reduction_orders(params, full.params)
  # …and so did its EMA profiles (docs/maths.md §14), updated from those parameters.
  saved = np.load(workdir / 'final_profiles.npz')
  profiles = [saved[f'arr_{i}'] for i in range(len(saved.files))]
  common.assert_params_close_across_reduction_orders(profiles, jax.tree.leaves(full.phema))


@pytest.mark.slow
def test_a_finished_run_fine_tunes_with_the_second_order_term(reference_run, tmp_path):
  """More steps with the second-order term (docs/maths.md §15.3): the finished workdir
  resumes without --allow_config_change, trains with finite loss and gradients (a
  non-finite step would stop it), and its config.json records the new fields."""
  _, workdir, full = reference_run
  shutil.copytree(workdir, tmp_path / 'w')
  cfg = _test_config(num_steps=7)
  cfg.model.second_order_weight = 0.1
  state = train.train_and_evaluate(cfg, str(tmp_path / 'w'))
  assert int(state.step) == 7
  kernel = lambda p: np.asarray(p['score_model']['conv_in']['kernel'])
  assert not np.array_equal(kernel(state.params), kernel(full.params))
  saved = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert saved['model']['second_order_weight'] == 0.1
  assert saved['training']['num_steps'] == 7


@pytest.mark.slow
def test_cli_overrides_reach_the_model_and_typos_are_refused(tmp_path):
  args = ('-m', 'vdm_jax.main', '--config=configs/test.py', f'--workdir={tmp_path}',
          '--config.model.n_embd=16', '--config.training.num_steps=2')
  trained, evaluated, bad = common.run_commands(
      args, (*args, '--mode=eval', '--config.eval.num_examples=10'),
      ('-m', 'vdm_jax.main', '--config=configs/test.py', f'--workdir={tmp_path}',
       '--config.model.n_embdd=16'))
  assert trained.returncode == 0, trained.stderr[-3000:]
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['n_embd'] == 16 and saved['training']['num_steps'] == 2
  cfg = common.load_config('test')
  cfg.model.n_embd = 16
  params = common.params_of(tmp_path, cfg)
  assert params['score_model']['conv_in']['kernel'].shape[-1] == 16
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'test bpd' in evaluated.stdout
  result = json.loads((tmp_path / 'eval_results.json').read_text())
  assert result['num_examples'] == 10 and math.isfinite(result['bpd'])
  assert bad.returncode != 0 and 'n_embdd' in bad.stderr


@pytest.mark.slow
def test_tfds_dataset_through_mock_data(tmp_path):
  cfg = _test_config(num_steps=2, checkpoint_every=2)
  cfg.data.dataset = 'mnist'
  cfg.model.vocab_size = 256
  cfg.eval.num_examples = 16
  cfg.eval.batch_size = 8
  datasets.clear_cache()
  try:
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
      state = train.train_and_evaluate(cfg, str(tmp_path))
      results = evaluate.evaluate_workdir(cfg, str(tmp_path))
  finally:
    datasets.clear_cache()
  assert int(state.step) == 2
  assert state.params['score_model']['conv_in']['kernel'].shape[2] == 1 + 2 * 2  # 28x28x1
  assert results['num_examples'] == 16 and math.isfinite(results['bpd'])


@pytest.mark.slow
def test_sample_mode_writes_a_png(reference_run, tmp_path):
  cfg, trained, _ = reference_run
  workdir = tmp_path / 'workdir'
  shutil.copytree(trained, workdir)
  path, quality = sampling.sample_workdir(cfg, str(workdir))
  assert quality is None  # configs/test.py scores no samples
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = np.asarray(Image.open(path))
  assert img.ndim == 2 and img.shape[0] >= 2 * 8  # a grid of 4 samples of 8x8
