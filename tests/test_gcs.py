"""Workdirs on gs:// (vdm_jax/runtime/gcs.py), against the storage emulator that
tests/conftest.py starts once per session: the exclusive lock, training, resuming and
the faults of a bucket."""

import json
import threading
import time
import uuid

from etils import epath
import jax
import numpy as np
import pytest

import common
from vdm_jax import errors
from vdm_jax.runtime import gcs
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock


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


def _copy_folder(source, target) -> None:
  """Copies every object under the gs:// folder `source` to `target`."""
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  bucket, prefix = gcs.split(source)
  _, new_prefix = gcs.split(target)
  client = storage.Client(project='test')
  for blob in client.list_blobs(bucket, prefix=prefix + '/'):
    client.bucket(bucket).copy_blob(blob, client.bucket(bucket),
                                    new_prefix + blob.name[len(prefix):])


@pytest.fixture(scope='module')
def trained(gcs_bucket, tmp_path_factory):
  """(config, gs:// workdir, final state): configs/test.py trained on the bucket, from a
  local folder as the working directory (nothing may land there)."""
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  cwd = tmp_path_factory.mktemp('cwd')
  config = common.load_config('test')
  workdir = _fresh(gcs_bucket)
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(cwd)
    state = train.train_and_evaluate(config, workdir)
  assert not list(cwd.iterdir()), 'a gs:// path was written as a local one'
  return config, workdir, state, cwd


@pytest.mark.slow
def test_training_writes_its_workdir_to_the_bucket_only(trained):
  config, workdir, state, _ = trained
  path = epath.Path(workdir)
  assert (path / 'config.json').exists()
  steps = sorted(int(p.name) for p in (path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == config.training.num_steps
  assert any(p.name.startswith('events.out.tfevents') for p in path.iterdir())
  common.assert_trees_equal(common.params_of(workdir, config),
                            jax.tree.map(np.asarray, state.params))


@pytest.mark.slow
def test_resuming_from_a_bucket_is_bit_identical(trained, gcs_bucket, monkeypatch):
  """Training to the end, then again from its step-2 checkpoint copied to a new path,
  gives the same parameters, EMA and optimiser state."""
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  config, workdir, state, cwd = trained
  monkeypatch.chdir(cwd)
  branch = epath.Path(_fresh(gcs_bucket))
  (branch / 'checkpoints').mkdir(parents=True)
  source = epath.Path(workdir)
  (branch / 'config.json').write_bytes((source / 'config.json').read_bytes())
  first = min(int(p.name) for p in (source / 'checkpoints').iterdir() if p.name.isdigit())
  assert first < config.training.num_steps
  _copy_folder(source / 'checkpoints' / str(first), branch / 'checkpoints' / str(first))
  resumed = train.train_and_evaluate(config, str(branch))
  numpy = lambda t: jax.tree.map(np.asarray, t)
  common.assert_trees_equal(numpy(resumed), numpy(state))
  assert not list(cwd.iterdir())
