"""Tests of vdm_jax.runtime.workdir and vdm_jax.runtime.workdir_lock: the files of a run and its owner."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

import common
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.runtime import workdir_lock


def test_config_round_trip_and_garbled_config(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  assert wd.read_config() is None
  config = ml_collections.ConfigDict({'model': {'n_embd': 8, 'channel_mult': (1, 2)}})
  wd.write_config(config)
  assert wd.read_config() == {'model': {'n_embd': 8, 'channel_mult': [1, 2]}}
  assert sorted(os.listdir(tmp_path)) == ['config.json']  # no temporary file left
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(workdir_lib.WorkdirError, match=r'config.json is not valid JSON'):
    wd.read_config()


@pytest.mark.parametrize('where', ['local', 'bucket'])
def test_a_config_json_that_is_not_an_object_is_named(tmp_path, request, where):
  root = tmp_path if where == 'local' else request.getfixturevalue('gcs_bucket') + '/config'
  wd = workdir_lib.Workdir(root)
  for content, kind in (('[1, 2]', 'list'), ('42', 'int'), ('"str"', 'str'), ('null', 'NoneType')):
    (wd.path / 'config.json').write_text(content)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf'config.json holds a JSON {kind}, not the object of config '
                       'fields.*Restore it from a copy'):
      wd.read_config()
    assert (wd.path / 'config.json').read_text() == content


def test_results_and_png_are_written_atomically(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  wd.write_results({'bpd': 1.5}, step=7)
  assert wd.read_results() == {'bpd': 1.5, 'step': 7} == wd.read_results(7)
  path = wd.write_png(wd.samples_path(7), np.full((4, 6, 1), 200, np.uint8), scale=2)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(os.fspath(path)) as image:
    assert image.size == (12, 8) and np.asarray(image).max() == 200
  assert sorted(os.listdir(tmp_path)) == ['eval_results.json', 'eval_results_7.json',
                                          'samples_7.png']


def test_checkpoint_steps_count_only_finalised_step_folders(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  assert not wd.has_checkpoint()
  for name in ('10', '20', '30.damaged', '40.orbax-checkpoint-tmp-123', 'notes'):
    (tmp_path / 'checkpoints' / name).mkdir(parents=True)
  (tmp_path / 'checkpoints' / '50').write_text('a file, not a checkpoint')
  assert wd.checkpoint_steps() == [10, 20] and wd.has_checkpoint()


def test_create_and_require_name_what_is_wrong(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(workdir_lib.WorkdirError, match='is a file, not a folder'):
    workdir_lib.Workdir(tmp_path / 'file').create()
  with pytest.raises(workdir_lib.WorkdirError, match='a part of that path is a file'):
    workdir_lib.Workdir(tmp_path / 'file' / 'run').create()
  missing = workdir_lib.Workdir(tmp_path / 'missing')
  with pytest.raises(workdir_lib.WorkdirError, match='does not exist'):
    missing.require()
  assert not (tmp_path / 'missing').exists()  # nothing created
  workdir_lib.Workdir(tmp_path / 'a' / 'b').create()
  assert (tmp_path / 'a' / 'b').is_dir()
  with pytest.raises(workdir_lib.WorkdirError, match=r'File name too long \(a name in that '
                     'path is longer than the file system allows.*choose a shorter --workdir'):
    workdir_lib.Workdir(tmp_path / ('x' * 256) / 'run').create()
  assert sorted(os.listdir(tmp_path)) == ['a', 'file']


# ------------------------------------------------------------------------ lock

_HOLDER = r'''
import sys, time
from vdm_jax.runtime import workdir
from vdm_jax.runtime import workdir_lock
with workdir_lock.hold(workdir.Workdir(sys.argv[1])):
  print('held', flush=True)
  time.sleep(600)
'''


def _start_holder(path):
  proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(path)], cwd=common.REPO,
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.stdout.readline().strip() == 'held'
  return proc


def test_second_owner_is_refused_naming_the_first_and_a_killed_owner_is_replaced(tmp_path):
  wd = workdir_lib.Workdir(tmp_path)
  holder = _start_holder(tmp_path)
  try:
    with pytest.raises(workdir_lock.WorkdirBusyError) as e:
      workdir_lock.acquire(wd)
    message = str(e.value)
    assert f'process {holder.pid} on host {socket.gethostname()!r}' in message
    assert 'use another --workdir' in message
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert json.loads((tmp_path / 'lock.json').read_text())['pid'] == holder.pid  # stale
  with workdir_lock.hold(wd):  # taken over at once: its owner is gone
    assert json.loads((tmp_path / 'lock.json').read_text())['pid'] == os.getpid()
  assert not (tmp_path / 'lock.json').exists()  # released


@pytest.mark.parametrize('age,busy', [(10.0, True), (workdir_lock.STALE_SECONDS + 60, False)])
def test_an_owner_on_another_host_is_stale_only_when_its_heartbeat_is_old(tmp_path, age,
                                                                          busy):
  record = dict(host='another-host', pid=1, started=time.time() - 3600,
                heartbeat=time.time() - age, token='theirs')
  (tmp_path / 'lock.json').write_text(json.dumps(record))
  wd = workdir_lib.Workdir(tmp_path)
  if busy:
    with pytest.raises(workdir_lock.WorkdirBusyError, match="host 'another-host'"):
      workdir_lock.acquire(wd)
    assert json.loads((tmp_path / 'lock.json').read_text())['token'] == 'theirs'
  else:
    assert workdir_lock.acquire(wd)['pid'] == os.getpid()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  wd = workdir_lib.Workdir(tmp_path)
  with workdir_lock.hold(wd):
    first = json.loads((tmp_path / 'lock.json').read_text())['heartbeat']
    time.sleep(0.5)
    assert json.loads((tmp_path / 'lock.json').read_text())['heartbeat'] > first


def _wait_for(condition, seconds: float = 10.0) -> bool:
  deadline = time.monotonic() + seconds
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.02)
  return True


def test_a_block_stuck_past_a_lock_problem_is_stopped_by_the_watchdog(tmp_path, monkeypatch):
  """on_lost is called once the problem has lasted min(timeout, LOST_GRACE_SECONDS) and
  the block still runs (as if blocked on the storage); never while the lock is fine."""
  def full_disk(self, data):
    raise OSError(28, 'No space left on device')
  timeout, calls = 0.3, []
  lost = lambda message: calls.append((time.monotonic(), message))
  with workdir_lock.hold(workdir_lib.Workdir(tmp_path), timeout=timeout, on_lost=lost):
    time.sleep(4 * timeout)
    assert calls == []  # refreshed all along
    monkeypatch.setattr(workdir_lock._LocalLock, 'refresh', full_disk)  # pylint: disable=protected-access
    failing = time.monotonic()
    assert _wait_for(lambda: calls)
  (at, message), = calls
  assert 2 * timeout - 0.1 <= at - failing <= 2 * timeout + 1.0  # the problem, then grace
  assert 'has not answered' in message and 'stopped from the lock\'s watchdog' in message


def test_a_lock_left_unrefreshed_for_the_timeout_is_a_problem_until_it_is_refreshed(
    tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  refresh = workdir_lock._LocalLock.refresh  # pylint: disable=protected-access
  def full_disk(self, data):
    raise OSError(28, 'No space left on device')
  timeout = 0.4
  with workdir_lock.hold(workdir_lib.Workdir(tmp_path), timeout=timeout) as holding:
    time.sleep(2 * timeout)
    assert holding.problem() is None  # refreshed all along
    monkeypatch.setattr(workdir_lock._LocalLock, 'refresh', full_disk)  # pylint: disable=protected-access
    failing = time.monotonic()
    assert _wait_for(holding.problem)
    assert time.monotonic() - failing >= timeout - 0.1  # the last good refresh's age
    assert 'has not answered' in holding.problem() and 'No space left' in holding.problem()
    monkeypatch.setattr(workdir_lock._LocalLock, 'refresh', refresh)  # pylint: disable=protected-access
    assert _wait_for(lambda: holding.problem() is None)


def test_a_lock_taken_over_is_a_problem_and_training_stops_without_saving(tmp_path,
                                                                          monkeypatch):
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(workdir_lock, 'HEARTBEAT_SECONDS', 0.05)
  with workdir_lock.hold(workdir_lib.Workdir(tmp_path)) as holding:
    (tmp_path / 'lock.json').write_text(json.dumps(dict(pid=1, token='theirs')))
    assert _wait_for(holding.problem)
    assert 'taken over' in holding.problem()
  assert json.loads((tmp_path / 'lock.json').read_text())['token'] == 'theirs'  # kept
  monkeypatch.setattr(workdir_lock.Holding, 'problem', lambda self: 'the storage is gone')
  with pytest.raises(workdir_lock.LockLostError, match='the storage is gone'):
    train.train_and_evaluate(common.load_config('test'), str(tmp_path / 'run'))
  assert workdir_lib.Workdir(tmp_path / 'run').checkpoint_steps() == []
