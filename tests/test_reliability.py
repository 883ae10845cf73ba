"""Reliability: preemption, SIGKILL at any moment, damaged checkpoints, non-finite steps,
and validation of config, data and checkpoints before a workdir is touched.

Runs that need a real signal are subprocesses of the CLI; the rest run in process. All
share one persistent XLA cache, so the training step is compiled once per session.
"""

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

import common
from common import BackgroundCli as _Cli
from vdm_jax import build
from vdm_jax.data import datasets
from vdm_jax.data import input_pipeline
from vdm_jax import errors
from vdm_jax.evaluation import evaluate
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import train
from vdm_jax import validation

NUM_STEPS = 20
# One step per dispatch, so that a run resumed at any step repeats the same programs.
TRAINING = dict(num_steps=NUM_STEPS, steps_per_call=1, log_every=1)
KILL_TRAINING = dict(TRAINING, checkpoint_every=1, keep_checkpoints=2)
SIGNAL_TRAINING = dict(TRAINING, checkpoint_every=1000)  # only the end is a regular save
TMP_MARK = '.orbax-checkpoint-tmp'
# Noise levels from the adaptive proposal, so that its state (per-bin loss averages) is
# part of every checkpoint, kill and resume below, beside parameters, EMA and optimiser.
MODEL = dict(time_sampling='adaptive')
# Snapshots of the EMA profiles (docs/maths.md §14) between the checkpoints' steps, so that
# kills also cut their writes and resumed runs rewrite none of them differently.
SNAPSHOTS = dict(snapshot_every=3)

# Every test here trains, or reads a trained workdir; the CLI processes are killed after
# each test.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('background_clis')]


# -------------------------------------------------------------------- helpers


def _config(**sections):
  """configs/test.py with MODEL and overrides, e.g. _config(training=dict(num_steps=4))."""
  cfg = common.load_config('test')
  for section, values in {'model': MODEL, **sections}.items():
    for key, value in values.items():
      cfg[section][key] = value
  return cfg


def _flags(**sections) -> list[str]:
  return [f'--config.{section}.{key}={value}' for section, values in
          {'model': MODEL, **sections}.items() for key, value in values.items()]


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _ckpt_dir(workdir) -> str:
  return os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)


def _complete_steps(workdir) -> list[int]:
  path = _ckpt_dir(workdir)
  names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(n) for n in names if n.isdigit())


def _partial(workdir) -> set[str]:
  path = _ckpt_dir(workdir)
  return {n for n in os.listdir(path) if TMP_MARK in n} if os.path.isdir(path) else set()


def _restore(workdir, cfg, step=None):
  """The full TrainState at `step` (default: what training would resume from)."""
  if step is None:
    return _numpy(build.restore(cfg, str(workdir))[1])
  abstract = build.build(cfg).abstract_state()
  manager = checkpoints.make_manager(workdir_lib.Workdir(workdir), asynchronous=False)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  finally:
    manager.close()
  return _numpy(restored['state'])


def _snapshots(workdir, cfg) -> dict:
  """{step: profiles} of every complete snapshot of the EMA profiles in the workdir."""
  wd = workdir_lib.Workdir(workdir)
  abstract = build.build(cfg).abstract_state().params
  manager = checkpoints.make_snapshot_manager(wd, asynchronous=False)
  try:
    return {t: _numpy(checkpoints.restore_snapshot(manager, t, abstract, 2))
            for t in manager.all_steps()}
  finally:
    manager.close()


def _fingerprint(workdir) -> dict:
  """sha256 of every file of the checkpoints and of config.json."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, workdir)
      if rel == workdir_lib.CONFIG_FILE or rel.startswith(workdir_lib.CHECKPOINT_DIR + os.sep):
        with open(path, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _damage_messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if 'damaged' in r.getMessage()]


def _poison(monkeypatch, step: int, value: float) -> None:
  """Training batch `step` gets conditioning = value (e.g. NaN)."""
  original = input_pipeline.train_batches

  def poisoned(data_config, *, start_step=0, **kwargs):
    for k, batch in enumerate(original(data_config, start_step=start_step, **kwargs),
                              start_step):
      if k == step:
        batch = dict(batch, conditioning=np.full_like(batch['conditioning'], value))
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', poisoned)


def _scalars(workdir, tag: str) -> dict:
  """{step: value} of one scalar from the workdir's TensorBoard event files."""
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'tensors': 0})
  acc.Reload()
  return {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
          for e in acc.Tensors(tag)}


# ------------------------------------------------------------------- fixtures


@pytest.fixture
def cli_env():
  """The CLI's environment, with the session's compilation cache (tests/conftest.py),
  which the in-process reference run fills."""
  return dict(os.environ, JAX_PLATFORMS='cpu')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run, in process, keeping the checkpoint of every step."""
  workdir = tmp_path_factory.mktemp('reference')
  cfg = _config(training=dict(KILL_TRAINING, keep_checkpoints=NUM_STEPS), phema=SNAPSHOTS)
  final = _numpy(train.train_and_evaluate(cfg, str(workdir)))
  assert _complete_steps(workdir) == list(range(1, NUM_STEPS + 1))
  sampler = final.time_sampler  # the proposal learnt something to be restored
  assert np.all(sampler.updates >= 0) and sampler.updates.sum() > 0
  assert np.all(sampler.mean_loss >= 0) and sampler.mean_loss.max() > 0
  return cfg, workdir, final


# ---------------------------------------------------------------- crashes


def test_sigkill_at_random_moments_resumes_bit_identically(reference, tmp_path, cli_env,
                                                           caplog):
  ref_cfg, ref_dir, final = reference
  cfg = _config(training=KILL_TRAINING, phema=SNAPSHOTS)
  flags = _flags(training=KILL_TRAINING, phema=SNAPSHOTS)
  quiet = _config(training=dict(KILL_TRAINING, log_every=NUM_STEPS,
                                checkpoint_every=NUM_STEPS),
                  phema=SNAPSHOTS)  # the same steps, faster
  snapshots = _snapshots(ref_dir, ref_cfg)
  assert sorted(snapshots) == [3, 6, 9, 12, 15, 18, 20]
  workdir = tmp_path / 'run'
  rng = random.Random(20211020)
  newest = 0  # the newest complete checkpoint so far: it must never go away
  kills, killed_mid_write = 0, 0
  for moment in ('write', 'random', 'write'):
    marker = newest + rng.randint(2, 4)
    if marker > NUM_STEPS - 3:  # leave a few steps to the end
      break
    kills += 1
    leftovers = _partial(workdir)
    run = _Cli(workdir, flags, cli_env)
    assert run.wait_for(rf'\] \[{marker}\] train/'), run.output[-3000:]
    if moment == 'write':  # as soon as orbax starts a checkpoint (its temporary folder)
      new = set()
      while not new and run.proc.poll() is None:
        new = _partial(workdir) - leftovers
        time.sleep(0.001)
    else:  # anywhere in the next step: computing, logging, saving
      time.sleep(rng.uniform(0.0, 1.0) * run.step_interval())
    run.send(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL, run.output[-3000:]
    if moment == 'write':
      killed_mid_write += bool(new & _partial(workdir))  # the write was cut short
    print(f'SIGKILL ({moment}) after step {marker}: complete {_complete_steps(workdir)}, '
          f'partial {sorted(_partial(workdir))}')

    complete = _complete_steps(workdir) or [0]
    # Saving step k waits for the save of k - 1: when '[marker]' was logged, the save
    # of marker - 2 was complete.
    assert complete[-1] >= max(newest, marker - 2), (complete, newest, marker)
    newest = complete[-1]
    if newest:
      caplog.clear()
      with caplog.at_level(logging.INFO):
        state = _restore(workdir, cfg)
      assert not _damage_messages(caplog)
      assert int(state.step) == newest  # the newest complete one, never a partial one
      common.assert_trees_equal(state, _restore(ref_dir, ref_cfg, newest))
    # The next run (here in process, on a copy) completes as if nothing had happened.
    branch = tmp_path / f'after_kill_{kills}'
    shutil.copytree(workdir, branch)
    common.assert_trees_equal(_numpy(train.train_and_evaluate(quiet, str(branch))), final)
    common.assert_trees_equal(_snapshots(branch, cfg), snapshots)
  assert kills >= 3 and killed_mid_write >= 1, (kills, killed_mid_write)

  run = _Cli(workdir, flags, cli_env)  # and the same command, once more
  assert run.finish() == 0, run.output[-3000:]
  assert f'from step {newest} to {NUM_STEPS}' in run.output
  common.assert_trees_equal(_restore(workdir, cfg), final)
  common.assert_trees_equal(_snapshots(workdir, cfg), snapshots)


@pytest.mark.parametrize('damage', ['truncated_arrays', 'garbled_metadata'])
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax
def test_damaged_newest_checkpoint_is_reported_and_the_previous_used(
    reference, tmp_path, caplog, damage):
  ref_cfg, ref_dir, final = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  for step in range(1, NUM_STEPS - 2):  # keep the last three
    shutil.rmtree(os.path.join(_ckpt_dir(workdir), str(step)))
  state_dir = os.path.join(_ckpt_dir(workdir), str(NUM_STEPS), 'state')
  if damage == 'truncated_arrays':
    for root, _, files in os.walk(state_dir):
      for name in files:
        if os.path.basename(root) == 'd':
          os.truncate(os.path.join(root, name), 0)
  else:
    with open(os.path.join(state_dir, '_METADATA'), 'w') as f:
      f.write('{"tree_metadata": ')
  cfg = _config(training=dict(KILL_TRAINING, keep_checkpoints=1))
  with caplog.at_level(logging.INFO):
    state = _numpy(train.train_and_evaluate(cfg, str(workdir)))
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert any(f'Checkpoint at step {NUM_STEPS} in' in m and 'damaged' in m
             for m in errors), errors
  assert any(f'Restored checkpoint at step {NUM_STEPS - 1}' in r.getMessage()
             for r in caplog.records)
  common.assert_trees_equal(state, final)
  # The damaged one is kept aside; the step it held was written again, and with
  # keep_checkpoints=1 that good checkpoint is the one kept.
  assert os.path.isdir(os.path.join(_ckpt_dir(workdir), f'{NUM_STEPS}.damaged'))
  assert _complete_steps(workdir) == [NUM_STEPS]
  common.assert_trees_equal(_restore(workdir, cfg), final)


# ---------------------------------------------------------------- preemption


def test_sigterm_and_sigint_checkpoint_the_step_in_flight(reference, tmp_path, cli_env):
  _, _, final = reference
  cfg = _config(training=SIGNAL_TRAINING)
  flags = _flags(training=SIGNAL_TRAINING)
  workdir = tmp_path / 'run'
  marker, stops = 3, []
  for sig in (signal.SIGTERM, signal.SIGINT):
    run = _Cli(workdir, flags, cli_env)
    assert run.wait_for(rf'\] \[{marker}\] train/'), run.output[-3000:]
    run.send(sig)
    assert run.finish() == errors.PREEMPTED_EXIT_CODE, run.output[-3000:]
    found = re.search(r'Stopped by signal at step (\d+); checkpoint written to (\S+)\. '
                      r'Run the same command again to continue\.', run.output)
    assert found, run.output[-3000:]
    assert f'Received signal {int(sig)}' in run.output
    step = int(found.group(1))
    assert found.group(2) == os.path.abspath(_ckpt_dir(workdir))
    assert marker <= step < NUM_STEPS  # the step in flight, not the end of training
    stops.append(step)
    assert _complete_steps(workdir) == stops  # written at that step, nowhere else
    assert int(_restore(workdir, cfg).step) == step
    marker = step + 2
  run = _Cli(workdir, flags, cli_env)
  assert run.finish() == 0, run.output[-3000:]
  assert f'from step {stops[-1]} to {NUM_STEPS}' in run.output
  assert _complete_steps(workdir) == stops + [NUM_STEPS]
  common.assert_trees_equal(_restore(workdir, cfg), final)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_stop_at_the_same_step_and_agree_with_one(reference, tmp_path, cli_env):
  """jax.distributed: two processes of one device each, one of them told to stop."""
  ref_cfg, ref_dir, _ = reference
  cfg = _config(training=SIGNAL_TRAINING)
  flags = _flags(training=dict(SIGNAL_TRAINING, num_steps=1000))
  env = dict(cli_env, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  port = _free_port()
  runs = [_Cli(tmp_path, flags + [f'--coordinator_address=localhost:{port}',
                                  '--num_processes=2', f'--process_id={i}'], env)
          for i in range(2)]
  assert runs[0].wait_for(r'\] \[3\] train/'), runs[0].output[-3000:]
  runs[1].send(signal.SIGTERM)  # only one process is told
  codes = [run.finish() for run in runs]
  assert codes == [errors.PREEMPTED_EXIT_CODE] * 2, [r.output[-2000:] for r in runs]
  assert 'Process 1 of 2' in runs[1].output and '2 device(s)' in runs[0].output
  steps = [int(re.search(r'Stopped by signal at step (\d+)', r.output).group(1))
           for r in runs]
  assert steps[0] == steps[1] and 3 <= steps[0] < NUM_STEPS  # the reference kept 1..20
  assert 'Received signal' in runs[1].output and 'Received signal' not in runs[0].output
  assert _complete_steps(tmp_path) == [steps[0]]
  state = _restore(tmp_path, cfg)
  assert int(state.step) == steps[0]
  # The two processes trained like one (the learning rate does not depend on
  # num_steps): the same global batches, noise levels and proposal, reduced in
  # another order.
  reference_state = _restore(ref_dir, ref_cfg, steps[0])
  common.assert_params_close_across_reduction_orders(state.params, reference_state.params)
  np.testing.assert_allclose(state.time_sampler.mean_loss,
                             reference_state.time_sampler.mean_loss, rtol=1e-4)


# ---------------------------------------------------------------- non-finite


def test_nonfinite_step_stops_with_the_terms_and_keeps_the_last_checkpoint(
    reference, tmp_path, monkeypatch):
  _, _, final = reference
  cfg = _config(training=dict(TRAINING, checkpoint_every=2))
  with monkeypatch.context() as patch:
    _poison(patch, step=3, value=np.nan)
    with pytest.raises(errors.NonFiniteError) as e:
      train.train_and_evaluate(cfg, str(tmp_path))
  message = str(e.value)
  assert message.startswith('Non-finite values at step 3: diffusion, gradient ('), message
  assert 'reconstruction' not in message and 'prior' not in message
  assert 'last good checkpoint is intact' in message and 'skip_nonfinite=True' in message
  assert _complete_steps(tmp_path) == [2] and not _partial(tmp_path)
  state = _restore(tmp_path, cfg)
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  # Without the bad batch, the same command continues as if nothing had happened.
  common.assert_trees_equal(_numpy(train.train_and_evaluate(cfg, str(tmp_path))), final)


def test_a_workdir_without_checkpoints_takes_a_new_model_config(tmp_path, monkeypatch):
  cfg = _config(training=dict(TRAINING, num_steps=2, checkpoint_every=2))
  with monkeypatch.context() as patch:
    _poison(patch, step=0, value=np.nan)
    with pytest.raises(errors.NonFiniteError, match='at step 0: '):
      train.train_and_evaluate(cfg, str(tmp_path))
  assert _complete_steps(tmp_path) == []  # nothing was trained: nothing to protect
  cfg.data.augment = True
  state = train.train_and_evaluate(cfg, str(tmp_path))
  assert int(state.step) == 2
  assert workdir_lib.Workdir(str(tmp_path)).read_config()['data']['augment'] is True


def test_skip_nonfinite_skips_and_counts_the_step(tmp_path, monkeypatch):
  cfg = _config(training=dict(TRAINING, log_every=2, checkpoint_every=1,
                              keep_checkpoints=NUM_STEPS, skip_nonfinite=True))
  _poison(monkeypatch, step=3, value=np.nan)
  state = _numpy(train.train_and_evaluate(cfg, str(tmp_path)))
  assert int(state.step) == NUM_STEPS
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  skipped = _scalars(tmp_path, 'train/skipped_steps')
  assert skipped[2] == 0 and skipped[4] == 1 and skipped[NUM_STEPS] == 1
  loss = _scalars(tmp_path, 'train/loss')  # steps 2 and 3 averaged: 3 is left out
  assert len(loss) == NUM_STEPS // 2 and all(math.isfinite(v) for v in loss.values())
  # Step 3 left parameters, optimiser state and EMA as they were; only the count moved.
  before, after = _restore(tmp_path, cfg, 3), _restore(tmp_path, cfg, 4)
  assert int(after.step) == 4
  common.assert_trees_equal(after.replace(step=before.step), before)
  kernel = lambda state: state.params['score_model']['conv_in']['kernel']
  assert not np.array_equal(kernel(_restore(tmp_path, cfg, 5)), kernel(after))  # 4 trained


# ---------------------------------------------------------------- validation


def _write_npz(path, train_images, test_images=None) -> str:
  np.savez(path, train=train_images,
           test=train_images[:16] if test_images is None else test_images)
  return str(path)


def _digits(n: int = 64) -> np.ndarray:
  return np.asarray(datasets.load_split(_config().data, 'train')[:n])


def _npz_config(npz_path, **sections):
  cfg = _config(training=dict(TRAINING, num_steps=2, checkpoint_every=2), **sections)
  cfg.data.dataset = 'npz'
  cfg.data.npz_path = str(npz_path)
  cfg.model.vocab_size = 256
  cfg.eval.num_examples = None
  return cfg


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A workdir with a checkpoint and config.json, trained on a user .npz (8x8x1)."""
  root = tmp_path_factory.mktemp('trained')
  cfg = _npz_config(_write_npz(root / 'data.npz', _digits()))
  train.train_and_evaluate(cfg, str(root / 'workdir'))
  assert _complete_steps(root / 'workdir') == [2]
  return cfg, root / 'workdir'


@pytest.fixture
def workdir_copy(trained, tmp_path):
  """A copy of the trained workdir, its fingerprint, and its config."""
  cfg, source = trained
  workdir = tmp_path / 'workdir'
  shutil.copytree(source, workdir)
  return workdir, _fingerprint(workdir), json.loads(json.dumps(cfg.to_dict()))


def _fresh(cfg_dict, **changes):
  """The trained workdir's config with changes, e.g. **{'model.n_embd': 16}."""
  cfg = common.load_config('test')
  cfg.update(cfg_dict)
  for dotted, value in changes.items():
    section, key = dotted.split('.')
    cfg[section][key] = value
  return cfg


_BAD_CONFIGS = {
    'unknown_key': ({'training.num_stepz': 10}, [
        'config.training.num_stepz is not a known field (typo?)', 'num_steps']),
    'schedule': ({'model.schedule': 'cosine'}, [
        "config.model.schedule = 'cosine' is not one of 'fixed_linear', "
        "'learned_linear', 'learned_nnet'"]),
    'weighting': ({'model.weighting': 'snr'}, [
        "config.model.weighting = 'snr' is not one of 'elbo', 'sigmoid', "
        "'elbo_plus_sigmoid'"]),
    'sigmoid_scale': ({'model.sigmoid_scale': -1.0}, [
        'config.model.sigmoid_scale = -1.0: must be >= 0']),
    'dataset': ({'data.dataset': 'cifar100'}, [
        "config.data.dataset = 'cifar100' is not one of 'mnist_embedded', 'digits', "
        "'npz', 'cifar10'"]),
    'negative_T': ({'model.timesteps': -1}, [
        'config.model.timesteps = -1: must be ≥ 0']),
    'gamma_range': ({'model.gamma_min': 5.0}, [
        'config.model.gamma_min = 5.0 must be < config.model.gamma_max = 5.0']),
    'groupnorm': ({'model.groupnorm_groups': 3}, [
        'config.model.n_embd = 8 does not divide by config.model.groupnorm_groups = 3',
        'choose groups among [1, 2, 4, 8]']),
    'fourier_range': ({'model.fourier_n_min': 5}, [
        'config.model.fourier_n_min = 5 > fourier_n_max = 4',
        'empty or inverted']),
    'channel_mult': ({'model.channel_mult': (1, 0)}, [
        'config.model.channel_mult = (1, 0): must be a non-empty tuple of integers ≥ 1']),
    'channel_mult_levels': ({'model.channel_mult': (1, 2, 2, 2, 2)}, [
        'halves the image 4 time(s), so H and W must divide by 16', 'is 8x8']),
    'vocab_size': ({'model.vocab_size': 17}, [
        'config.model.vocab_size = 17 does not match the data: npz has V = 256',
        '--config.model.vocab_size=256']),
}


@pytest.mark.parametrize('case', list(_BAD_CONFIGS))
def test_bad_config_is_refused_before_touching_the_workdir(workdir_copy, case):
  workdir, before, cfg_dict = workdir_copy
  changes, expected = _BAD_CONFIGS[case]
  with pytest.raises(validation.ConfigError) as e:
    train.train_and_evaluate(_fresh(cfg_dict, **changes), str(workdir))
  for text in expected:
    assert text in str(e.value)
  assert _fingerprint(workdir) == before


def test_all_config_problems_are_reported_at_once(workdir_copy):
  workdir, before, cfg_dict = workdir_copy
  cfg = _fresh(cfg_dict, **{'model.schedule': 'cosine', 'model.timesteps': -1,
                            'optimizer.decay': 'linear', 'model.attention_impl': 'flash'})
  with pytest.raises(validation.ConfigError) as e:
    train.train_and_evaluate(cfg, str(workdir))
  for field in ('config.model.schedule', 'config.model.timesteps', 'config.optimizer.decay',
                'config.model.attention_impl'):
    assert field in str(e.value)
  assert _fingerprint(workdir) == before


def test_batch_that_does_not_divide_over_the_devices(workdir_copy):
  workdir, before, cfg_dict = workdir_copy
  mesh = types.SimpleNamespace(devices=np.empty((3,), object))  # what validation reads
  with pytest.raises(validation.ConfigError) as e:
    train.train_and_evaluate(_fresh(cfg_dict), str(workdir), mesh=mesh)
  assert ('config.training.batch_size = 8 does not divide over the 3 devices (1 '
          'process(es)); use a multiple of 3 (e.g. 9)') in str(e.value)
  assert 'config.eval.batch_size = 64 does not divide over the 3 devices' in str(e.value)
  assert _fingerprint(workdir) == before


_BAD_DATA = {
    'dtype': (lambda d: d.astype(np.float32) / 16, [
        "'train' in", 'has dtype float32; it must be uint8',
        'convert with .astype(np.uint8)']),
    'shape': (lambda d: np.repeat(d, 5, axis=-1), [
        'has shape (64, 8, 8, 5); it must be [N, H, W, C] with C in 1..4']),
    'value_range': (lambda d: d.astype(np.int64) * 20, [
        'has dtype int64; it must be uint8', 'values lie in 0..255']),
    'too_few_images': (lambda d: d[:4], [
        'config.training.batch_size = 8', '4 training images',
        'lower the batch size or']),
}


@pytest.mark.parametrize('case', list(_BAD_DATA))
def test_bad_npz_is_refused_before_touching_the_workdir(workdir_copy, tmp_path, case):
  workdir, before, cfg_dict = workdir_copy
  make, expected = _BAD_DATA[case]
  path = _write_npz(tmp_path / f'{case}.npz', make(_digits()), _digits(16))
  with pytest.raises(validation.ConfigError) as e:  # the CLI's 'error: …', exit 2
    train.train_and_evaluate(_fresh(cfg_dict, **{'data.npz_path': path}), str(workdir))
  for text in expected:
    assert text in str(e.value)
  assert _fingerprint(workdir) == before


@pytest.mark.parametrize('dataset,expected', [
    ('mnist', ["tfds dataset 'mnist' is not prepared in", 'download_and_prepare()',
               'set data.data_dir to the folder']),
    ('downsampled_imagenet32', ['place the original files train_32x32.tar and '
                                'valid_32x32.tar', os.path.join('downloads', 'manual')]),
    ('npz', ['does not exist; point data.npz_path at a .npz file']),
])
def test_missing_data_says_what_to_do(workdir_copy, tmp_path, dataset, expected):
  workdir, before, cfg_dict = workdir_copy
  changes = {'data.data_dir': str(tmp_path / 'tfds'),
             'data.npz_path': str(tmp_path / 'missing.npz')}
  if dataset != 'npz':
    changes['data.dataset'] = dataset
  datasets.clear_cache()
  try:
    with pytest.raises(FileNotFoundError) as e:
      train.train_and_evaluate(_fresh(cfg_dict, **changes), str(workdir))
  finally:
    datasets.clear_cache()
  for text in expected:
    assert text in str(e.value)
  assert _fingerprint(workdir) == before


def test_cli_reports_bad_data_as_an_error_without_a_traceback(workdir_copy, tmp_path,
                                                             cli_env):
  workdir, before, cfg_dict = workdir_copy
  path = _write_npz(tmp_path / 'bad.npz', _digits().astype(np.float32))
  run = _Cli(workdir, ['--config.data.dataset=npz', f'--config.data.npz_path={path}',
                       '--config.model.vocab_size=256'], cli_env)
  assert run.finish() == 2, run.output[-3000:]
  assert 'error: ' in run.output and 'has dtype float32; it must be uint8' in run.output
  assert 'Traceback' not in run.output
  assert _fingerprint(workdir) == before


# ------------------------------------------------------- resumed config, checkpoints


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(workdir_copy):
  workdir, _, cfg_dict = workdir_copy
  with open(os.path.join(_ckpt_dir(workdir), '2', 'state', '_METADATA'), 'w') as f:
    f.write('garbage')
  before = _fingerprint(workdir)
  with pytest.raises(checkpoints.CheckpointError, match=r'None of the checkpoints \[2\] in '
                     '.* could be restored .* move it aside to start afresh'):
    train.train_and_evaluate(_fresh(cfg_dict), str(workdir))
  assert _fingerprint(workdir) == before


def test_resuming_with_another_model_is_refused_with_the_difference(workdir_copy):
  workdir, before, cfg_dict = workdir_copy
  cfg = _fresh(cfg_dict, **{'model.n_embd': 16, 'data.augment': True,
                            'training.num_steps': 4, 'optimizer.learning_rate': 0.1})
  with pytest.raises(validation.ConfigError) as e:
    train.train_and_evaluate(cfg, str(workdir))
  message = str(e.value)
  assert 'model.n_embd: saved 8, now 16' in message
  assert 'data.augment: saved False, now True' in message
  # Named as differences only where they define the model (the help may name others).
  assert 'learning_rate: saved' not in message and 'num_steps: saved' not in message
  assert '--allow_config_change' in message
  assert _fingerprint(workdir) == before


@pytest.mark.parametrize('changes,expected', [
    ({'model.n_embd': 16}, ['shape differs:', 'score_model/conv_in/kernel checkpoint '
                            '(3, 3, 5, 8) vs model (3, 3, 5, 16)']),
    ({'model.n_layer': 2}, ['missing in checkpoint: score_model/down.block_1/']),
    ({'model.with_fourier_features': False}, ['score_model/conv_in/kernel checkpoint '
                                              '(3, 3, 5, 8) vs model (3, 3, 1, 8)']),
])
def test_checkpoint_of_another_shape_names_the_parameters(workdir_copy, changes, expected):
  workdir, before, cfg_dict = workdir_copy
  cfg = _fresh(cfg_dict, **changes)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    train.train_and_evaluate(cfg, str(workdir), allow_config_change=True)
  message = str(e.value)
  assert 'The checkpoint at step 2' in message and 'holds a different model' in message
  for text in expected:
    assert text in message
  assert _fingerprint(workdir) == before


def test_allowed_config_change_continues_training(workdir_copy):
  workdir, _, cfg_dict = workdir_copy
  cfg = _fresh(cfg_dict, **{'data.augment': True, 'training.num_steps': 4})
  state = train.train_and_evaluate(cfg, str(workdir), allow_config_change=True)
  assert int(state.step) == 4 and _complete_steps(workdir) == [2, 4]
  saved = workdir_lib.Workdir(str(workdir)).read_config()
  assert saved['data']['augment'] is True  # the new config is the workdir's config now


# ---------------------------------------------- one owner, faults as messages


def test_a_second_trainer_refuses_at_once_naming_the_first(tmp_path, cli_env):
  first = _Cli(tmp_path, [f'--config.training.{k}={v}' for k, v in TRAINING.items()]
               + ['--config.training.num_steps=100000'], cli_env)
  assert first.wait_for(r'\] train/'), first.output[-3000:]  # training, lock held
  before = _fingerprint(tmp_path)
  started = time.monotonic()
  second = _Cli(tmp_path, ['--config.optimizer.learning_rate=0.5'], cli_env)
  assert second.finish() == 2, second.output[-3000:]
  assert time.monotonic() - started < 60  # before compiling anything
  assert f'is being trained by process {first.proc.pid} on host {socket.gethostname()!r}' \
      in second.output
  assert 'Traceback' not in second.output
  assert json.loads((tmp_path / 'config.json').read_text())['optimizer'][
      'learning_rate'] == 1e-3  # still the first run's
  assert _fingerprint(tmp_path)['config.json'] == before['config.json']
  first.send(signal.SIGKILL)
  first.finish()
  end = (_complete_steps(tmp_path) or [0])[-1] + 2  # killed before or after a checkpoint
  third = _Cli(tmp_path, [f'--config.training.{k}={v}' for k, v in TRAINING.items()]
               + [f'--config.training.num_steps={end}'], cli_env)  # lock taken over
  assert third.finish() == 0, third.output[-3000:]
  assert 'Taking over the stale lock' in third.output


def _cli_args(workdir, flags, mode='train', config='configs/test.py'):
  return ('-m', 'vdm_jax.main', f'--config={config}', f'--workdir={workdir}',
          f'--mode={mode}', *flags)


def _cli_errors(*cases):
  """Runs CLI commands one after another (common.run_commands); each must exit 2 with
  each of its expected texts and no traceback. A case is (args, expected texts).
  Returns each command's output."""
  outputs = []
  for (_, expected), proc in zip(cases, common.run_commands(*(a for a, _ in cases))):
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.args, output[-3000:])
    assert 'Traceback' not in output, output[-3000:]
    for text in expected:
      assert text in output, output[-3000:]
    outputs.append(output)
  return outputs


def test_faults_of_the_workdir_are_messages_that_change_nothing(workdir_copy):
  workdir, before, _ = workdir_copy
  npz = ['--config.data.dataset=npz',
         f'--config.data.npz_path={json.loads((workdir / "config.json").read_text())["data"]["npz_path"]}',
         '--config.model.vocab_size=256', '--config.eval.num_examples=16']
  _cli_errors(
      (_cli_args(workdir, npz + ['--config.training.num_steps=1']),
       ['config.training.num_steps = 1 is below the step of the newest checkpoint',
        'Set it to 2 or more']),
      (_cli_args(workdir, npz + ['--config.eval.num_examples=17'], mode='eval'),
       ["config.eval.num_examples = 17 exceeds the 16 images of the 'test' split"]),
      (_cli_args(workdir, npz + ['--config.model.p_drop=0.5', '--config.model.n_embd=16'],
                 mode='eval'), ['model.n_embd: saved 8, now 16']))
  assert _fingerprint(workdir) == before
  (workdir / 'config.json').write_text('{"model": ')
  _cli_errors((_cli_args(workdir, npz, mode='eval'),
               [f'{workdir / "config.json"} is not valid JSON']))
  (workdir / 'config.json').unlink()
  _damage_all = os.path.join(_ckpt_dir(workdir), '2', 'state', '_METADATA')
  with open(_damage_all, 'w') as f:
    f.write('garbage')
  _cli_errors((_cli_args(workdir, npz), [r'None of the checkpoints [2]', 'nothing was changed']))
  assert os.listdir(_ckpt_dir(workdir)) == ['2']


def test_eval_with_a_changed_training_only_field_works(workdir_copy):
  workdir, before, cfg_dict = workdir_copy
  cfg = _fresh(cfg_dict, **{'model.p_drop': 0.5, 'model.weighting': 'sigmoid'})
  results = evaluate.evaluate_workdir(cfg, str(workdir))
  assert results['step'] == 2 and math.isfinite(results['bpd'])


def test_config_and_flag_faults_are_messages(tmp_path):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  run = tmp_path / 'run'
  (tmp_path / 'file').write_text('x')
  _cli_errors(
      (_cli_args(run, ['--config.model.n_embdd=16']), ['names no field', 'n_embdd', 'n_embd']),
      (_cli_args(run, ['--config.model.n_embd=abc']), ['--config.model.n_embd=abc']),
      (_cli_args(run, [], config=tmp_path / 'missing.py'), ['no such file']),
      (_cli_args(run, [], config=broken), ['could not be loaded (SyntaxError']),
      (_cli_args(run, [], mode='eval'), ['does not exist or is not a folder']),
      (_cli_args(tmp_path / 'file', []), ['is a file, not a folder']),
      (_cli_args(tmp_path / 'file' / 'run', []), ['a part of that path is a file']))
  assert not run.exists()  # eval, and the refused runs, create nothing


_mount_tmpfs = common.mount_tmpfs


def test_read_only_workdir_is_a_message(tmp_path):
  _mount_tmpfs(tmp_path / 'ro', 'ro,size=1m')
  try:
    _cli_errors((_cli_args(tmp_path / 'ro', []), ['cannot write to', 'read-only']))
  finally:
    subprocess.run(['umount', str(tmp_path / 'ro')])


def test_full_disk_during_a_save_keeps_the_checkpoints_and_resumes(tmp_path, cli_env):
  """A tmpfs that the first checkpoints fill, then ENOSPC in the middle of a save."""
  disk = tmp_path / 'disk'
  _mount_tmpfs(disk, 'size=4m')
  try:
    workdir = disk / 'run'
    flags = [f'--config.training.{k}={v}' for k, v in TRAINING.items()]
    first = _Cli(workdir, flags + ['--config.training.num_steps=2'], cli_env)
    assert first.finish() == 0, first.output[-3000:]
    before = _fingerprint(workdir)
    checkpoint_bytes = sum(os.path.getsize(os.path.join(r, f))
                           for r, _, fs in os.walk(_ckpt_dir(workdir)) for f in fs)
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / 'filler'
    with open(filler, 'wb') as f:  # leave room for the lock and the logs, not a checkpoint
      f.write(b'\0' * max(0, free - checkpoint_bytes // 2))
    output, = _cli_errors((_cli_args(workdir, flags + ['--config.training.num_steps=4']),
                           ['is full (ENOSPC)', 'the checkpoints written before are intact '
                            '(newest: step 2)', 'run the same command again']))
    after = _fingerprint(workdir)  # config.json now holds num_steps = 4: the run began
    assert {k: after.get(k) for k in before if k.startswith('checkpoints/')} == {
        k: v for k, v in before.items() if k.startswith('checkpoints/')}, output[-2000:]
    assert _complete_steps(workdir) == [2]
    filler.unlink()
    again = _Cli(workdir, flags + ['--config.training.num_steps=4'], cli_env)
    assert again.finish() == 0, again.output[-3000:]
    assert _complete_steps(workdir)[-1] == 4
  finally:
    subprocess.run(['umount', str(disk)])


def test_an_imported_checkpoint_full_of_nan_is_refused(tmp_path):
  from vdm_jax import original  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  cfg = _config()
  run = build.build(cfg)
  params = jax.tree.map(lambda x: np.full(x.shape, np.nan, np.float32),
                        run.abstract_state().params)
  folder = tmp_path / 'checkpoints-0'
  folder.mkdir()
  (folder / 'ckpt-1.flax').write_bytes(flax.serialization.to_bytes(
      {'step': 1, 'params': params, 'ema_params': params, 'opt_state': {}}))
  with pytest.raises(original.OriginalCheckpointError, match='non-finite values'):
    original.import_checkpoint(cfg, str(folder), str(tmp_path / 'workdir'))
  assert not (tmp_path / 'workdir').exists()


def test_skipping_most_steps_stops_the_run(tmp_path, monkeypatch):
  cfg = _config(training=dict(TRAINING, checkpoint_every=5, skip_nonfinite=True))
  original = input_pipeline.train_batches

  def poisoned(data_config, *, start_step=0, **kwargs):
    for k, batch in enumerate(original(data_config, start_step=start_step, **kwargs),
                              start_step):
      yield dict(batch, conditioning=np.full_like(batch['conditioning'],
                                                   np.nan if k >= 5 else 0.0))

  monkeypatch.setattr(input_pipeline, 'train_batches', poisoned)
  with pytest.raises(errors.NonFiniteError, match=r'5 of the 10 steps since step 0 .* '
                     'more than training.max_skipped_fraction = 0.1'):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert _complete_steps(tmp_path) == [5]
  saved = _restore(tmp_path, cfg)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))
