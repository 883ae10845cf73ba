"""One owner per workdir: a lock file that names its holder and survives no crash.

Training (and checkpoint import) holds `WORKDIR/lock.json` for as long as it runs. The
file names the owner (host, pid, start time) and carries a heartbeat rewritten every
HEARTBEAT_SECONDS by a background thread. A second trainer refuses at once, naming the
owner. A lock is stale, and is taken over, when its owner is on this host and its
process is gone (SIGKILL, a crash), or when its heartbeat is older than STALE_SECONDS
(an owner on another host that died, or a hung one). Both kinds of workdir make the
create exclusive, so two starters cannot both win: a local (or network) file system
with O_EXCL, a bucket (gs://) with an upload on the condition that the object does not
exist; on a bucket, a stale lock is replaced on the condition that it is still the
generation read, so of two processes taking it over at once exactly one wins.
Evaluation and sampling take no lock: they only read finalised checkpoints.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vdm_jax import errors
from vdm_jax.runtime import gcs
from vdm_jax.runtime import workdir as workdir_lib

LOCK_FILE = 'lock.json'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0
# The owner stops once its heartbeat has failed this long: before others may take over.
SILENCE_LIMIT_SECONDS = STALE_SECONDS - 2 * HEARTBEAT_SECONDS
# With hold(on_lost=…): how long the block may go on with a lock problem before on_lost
# is called (its thread is blocked on the storage, say), and how often that is checked.
# The process then stops within SILENCE_LIMIT_SECONDS + 11 s < STALE_SECONDS.
LOST_GRACE_SECONDS = 10.0
WATCH_SECONDS = 1.0


class WorkdirBusyError(workdir_lib.WorkdirError):
  """Another live process owns the workdir."""


class LockLostError(workdir_lib.WorkdirError, errors.StorageLost):
  """The run no longer holds the lock surely: taken over, or unrefreshed too long."""


class Holding:
  """The state of a lock held (what the heartbeat thread saw), for the training loop.

  `problem()` is None while the lock is ours; else the message to stop with: another
  process took it over, or no refresh succeeded for `limit` seconds (the storage stopped
  answering). Processes other than 0 hold nothing and never see a problem.
  """

  def __init__(self, path=None, limit: float = SILENCE_LIMIT_SECONDS):
    self.path = path
    self.limit = min(limit, SILENCE_LIMIT_SECONDS)
    self.refreshed = time.monotonic()  # the last successful write
    self.error = None  # why the refreshes since then failed
    self.taken = False

  def problem(self):
    if self.path is None:
      return None
    if self.taken:
      return (f'The lock {self.path} was taken over by another process (see its record '
              'there), so this run stopped without saving. Two runs must not share a '
              'workdir; see which one should continue.')
    silent = time.monotonic() - self.refreshed
    if silent <= self.limit:
      return None
    return (f'The storage of the workdir has not answered for {silent:.0f} s: its lock '
            f'{self.path} could not be refreshed ({self.error}). The run stopped without '
            'saving (another run may take over a lock unrefreshed for '
            f'{STALE_SECONDS:.0f} s); the checkpoints complete before are intact. Check '
            'the storage (network, credentials, bucket or disk) and run the same command '
            'again: training resumes from the newest complete checkpoint.')


def _now() -> float:
  return time.time()


def _describe(owner: dict) -> str:
  started = datetime.datetime.fromtimestamp(owner.get('started', 0)).isoformat(' ', 'seconds')
  return (f"process {owner.get('pid')} on host {owner.get('host')!r}, started {started} "
          f"(heartbeat {(_now() - owner.get('heartbeat', 0)):.0f} s ago)")


def _is_stale(owner: dict) -> bool:
  if _now() - owner.get('heartbeat', 0) > STALE_SECONDS:
    return True
  if owner.get('host') == socket.gethostname():
    try:
      os.kill(int(owner['pid']), 0)
    except ProcessLookupError:
      return True
    except (PermissionError, KeyError, ValueError, TypeError):
      return False
  return False


def _parse(data) -> dict:
  """The lock's record; {} when there is none or it holds no record (half-written by a
  dying owner, or anything else: such a lock names no owner and is taken over)."""
  try:
    record = json.loads(data) if data is not None else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    return {}
  numbers = isinstance(record, dict) and all(
      isinstance(record.get(k, 0), (int, float)) for k in ('started', 'heartbeat'))
  return record if numbers else {}


class _LocalLock:
  """The lock file on a file system: O_EXCL create, rename to refresh, unlink to free."""

  def __init__(self, path):
    self.path = path

  def create(self, data: bytes) -> bool:
    try:
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True

  def read(self):
    """(content, modification time in ns), or (None, None) when there is no file."""
    try:
      return self.path.read_bytes(), os.stat(os.fspath(self.path)).st_mtime_ns
    except FileNotFoundError:
      return None, None

  def replace(self, data: bytes, generation) -> bool:
    """Takes over the stale lock: unlink, then create exclusively."""
    del generation  # not a condition here: a file system has no conditional rename
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass
    return self.create(data)

  def refresh(self, data: bytes) -> bool:
    tmp = self.path.parent / f'.{self.path.name}.tmp'
    tmp.write_bytes(data)
    tmp.replace(self.path)
    return True

  def delete(self) -> None:
    self.path.unlink()


class _BucketLock(gcs.LockObject):
  """The lock object on gs://: every write conditioned on the generation."""

  def refresh(self, data: bytes) -> bool:
    return self.replace(data, self.generation)


def _lock_of(wd: workdir_lib.Workdir):
  return _lock_at(wd.path / LOCK_FILE)


def _lock_at(path):
  return _BucketLock(path) if gcs.is_gcs(path) else _LocalLock(path)


def _read(path) -> dict:
  """The record of the lock at `path` ({} when there is none)."""
  return _owner(_lock_at(path))[0]


def _owner(lock) -> tuple[dict, object]:
  data, generation = lock.read()
  return _parse(data), generation


def acquire(wd: workdir_lib.Workdir, lock=None) -> dict:
  """Takes the lock (process 0), taking over a stale one; returns our record."""
  lock = _lock_of(wd) if lock is None else lock
  now = _now()
  record = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                token=uuid.uuid4().hex)
  data = json.dumps(record).encode()
  for _ in range(3):
    if lock.create(data):
      return record
    owner, generation = _owner(lock)
    if owner.get('token') == record['token']:
      return record  # our create succeeded, but its answer was lost and it was retried
    if owner and not _is_stale(owner):
      raise WorkdirBusyError(
          f'{wd.path} is being trained by {_describe(owner)}. Two runs must not share a '
          'workdir: wait for it to finish, stop it, or use another --workdir. (If that '
          f'process is gone, the lock {lock.path} is taken over automatically once its '
          f'heartbeat is {STALE_SECONDS:.0f} s old, or delete the file.)')
    if generation is None:
      continue  # freed meanwhile: create again
    logging.warning('Taking over the stale lock %s of %s.', lock.path,
                    _describe(owner) if owner else 'an unknown owner')
    if lock.replace(data, generation):
      return record
  raise WorkdirBusyError(f'Could not take the lock {lock.path}: other processes keep '
                         'taking it. Make sure only one run uses this --workdir.')


@contextlib.contextmanager
def hold(wd: workdir_lib.Workdir, timeout: float = SILENCE_LIMIT_SECONDS, on_lost=None):
  """Holds the workdir's lock (taken by process 0, agreed by all) for the block; yields
  a Holding, whose problem() the block checks (its heartbeat fails after `timeout`
  seconds, or SILENCE_LIMIT_SECONDS if that is shorter).

  on_lost(message), if given, is called from a watchdog thread when a problem has lasted
  min(timeout, LOST_GRACE_SECONDS) more without the block ending: the block's thread is
  blocked on the storage, where no check of problem() runs. The command line passes a
  function that ends the process, so that a run that lost its storage stops before
  another process may take the lock over, whatever its main thread waits on.
  """
  error, record, lock = None, None, None
  if jax.process_index() == 0:
    try:
      lock = _lock_of(wd)
      record = acquire(wd, lock)
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirBusyError(f'{wd.path} is owned by another run (see process 0).')
  if error is not None:
    raise error
  stop = threading.Event()
  holding, beat = Holding(), None
  if record is not None:
    holding = Holding(lock.path, timeout)
    beat = threading.Thread(target=_heartbeat, args=(lock, record, stop, holding),
                            daemon=True, name='vdm_jax-workdir-lock')
    beat.start()
    if on_lost is not None:
      threading.Thread(target=_watchdog, args=(holding, stop, on_lost), daemon=True,
                       name='vdm_jax-workdir-lock-watchdog').start()
  finished = False
  try:
    yield holding
    finished = True
  finally:
    stop.set()
    if beat is not None:
      # After a failure the heartbeat may be retrying an unreachable bucket: no wait.
      beat.join(timeout=gcs.LOCK_RETRY_SECONDS if finished else 1.0)
      _release(lock, record)


def _release(lock, record: dict) -> None:
  """Frees the lock if it is still ours; where that fails, it goes stale instead."""
  try:
    if isinstance(lock, _LocalLock):
      if _owner(lock)[0].get('token') == record['token']:
        lock.delete()
    else:
      lock.delete()  # conditioned on our generation
  except Exception as e:  # pylint: disable=broad-except  # never hide the run's own error
    logging.warning('Could not free the lock %s (%s); the next run takes it over as '
                    'stale.', lock.path, e)


def _watchdog(holding: Holding, stop: threading.Event, on_lost) -> None:
  """Calls on_lost(message) once holding.problem() has lasted the grace (hold)."""
  grace, since = min(holding.limit, LOST_GRACE_SECONDS), None
  while not stop.wait(min(WATCH_SECONDS, holding.limit / 3)):
    problem = holding.problem()
    if problem is None:
      since = None
    elif since is None:
      since = time.monotonic()
    elif time.monotonic() - since >= grace:
      on_lost(f'{problem} (It was waiting on the storage: stopped from the lock\'s '
              'watchdog.)')
      return


def _heartbeat(lock, record: dict, stop: threading.Event, holding: Holding) -> None:
  """Refreshes the lock until `stop`, at least three times within holding.limit."""
  while not stop.wait(min(HEARTBEAT_SECONDS, holding.limit / 3)):
    try:
      if isinstance(lock, _LocalLock) and _owner(lock)[0].get('token') != record['token']:
        taken = True
      else:
        record['heartbeat'] = _now()
        taken = not lock.refresh(json.dumps(record).encode())
    except Exception as e:  # pylint: disable=broad-except  # a full disk or an unreachable
      logging.warning('Could not refresh the lock %s: %s', lock.path, e)  # bucket: the
      holding.error = f'{type(e).__name__}: {str(e)[:300]}'  # loop decides (problem())
      continue
    if taken:
      logging.error('The lock %s was taken by another process.', lock.path)
      holding.taken = True
      return
    holding.refreshed, holding.error = time.monotonic(), None
