"""One owner per workdir: a lock file that names its holder and survives no crash.

Training (and checkpoint import) holds `WORKDIR/lock.json` for as long as it runs. The
file names the owner (host, pid, start time) and carries a heartbeat rewritten every
HEARTBEAT_SECONDS by a background thread. A second trainer refuses at once, naming the
owner. A lock is stale, and is taken over, when its owner is on this host and its
process is gone (SIGKILL, a crash), or when its heartbeat is older than STALE_SECONDS
(an owner on another host that died, or a hung one). On a local file system the lock
is created with O_EXCL, so two starters cannot both win; on object stores (gs://),
which have no exclusive create, it is written and read back, which leaves a window of
a second in which two simultaneous starts could both proceed. Evaluation and sampling
take no lock: they only read finalised checkpoints.
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

from vdm_jax.runtime import workdir as workdir_lib

LOCK_FILE = 'lock.json'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirBusyError(workdir_lib.WorkdirError):
  """Another live process owns the workdir."""


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


def _create(path, record: dict) -> bool:
  """Creates the lock file holding `record`; False when it already exists."""
  data = json.dumps(record).encode()
  if '://' not in str(path):
    try:
      fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True
  if path.exists():
    return False
  path.write_bytes(data)
  return json.loads(path.read_text()).get('token') == record['token']


def _read(path) -> dict:
  """The lock's record; {} when it vanished or holds no record (half-written by a dying
  owner, or anything else: such a file names no owner and is taken over)."""
  try:
    record = json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
    return {}
  numbers = isinstance(record, dict) and all(
      isinstance(record.get(k, 0), (int, float)) for k in ('started', 'heartbeat'))
  return record if numbers else {}


def acquire(wd: workdir_lib.Workdir) -> dict:
  """Takes the lock (process 0), taking over a stale one; returns our record."""
  path = wd.path / LOCK_FILE
  now = _now()
  record = dict(host=socket.gethostname(), pid=os.getpid(), started=now, heartbeat=now,
                token=uuid.uuid4().hex)
  for _ in range(3):
    if _create(path, record):
      return record
    owner = _read(path)
    if owner and not _is_stale(owner):
      raise WorkdirBusyError(
          f'{wd.path} is being trained by {_describe(owner)}. Two runs must not share a '
          'workdir: wait for it to finish, stop it, or use another --workdir. (If that '
          f'process is gone, the lock {path} is taken over automatically once its '
          f'heartbeat is {STALE_SECONDS:.0f} s old, or delete the file.)')
    logging.warning('Taking over the stale lock %s of %s.', path,
                    _describe(owner) if owner else 'an unknown owner')
    try:
      path.unlink()
    except FileNotFoundError:
      pass
  raise WorkdirBusyError(f'Could not take the lock {path}: other processes keep taking it. '
                         'Make sure only one run uses this --workdir.')


@contextlib.contextmanager
def hold(wd: workdir_lib.Workdir):
  """Holds the workdir's lock (taken by process 0, agreed by all) for the block."""
  error, record = None, None
  if jax.process_index() == 0:
    try:
      record = acquire(wd)
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not ok and error is None:
      error = WorkdirBusyError(f'{wd.path} is owned by another run (see process 0).')
  if error is not None:
    raise error
  stop = threading.Event()
  beat = None
  if record is not None:
    beat = threading.Thread(target=_heartbeat, args=(wd.path / LOCK_FILE, record, stop),
                            daemon=True, name='vdm_jax-workdir-lock')
    beat.start()
  try:
    yield
  finally:
    stop.set()
    if beat is not None:
      beat.join()
      if _read(wd.path / LOCK_FILE).get('token') == record['token']:
        (wd.path / LOCK_FILE).unlink()


def _heartbeat(path, record: dict, stop: threading.Event) -> None:
  while not stop.wait(HEARTBEAT_SECONDS):
    if _read(path).get('token') != record['token']:
      logging.error('The lock %s was taken by another process.', path)
      return
    record['heartbeat'] = _now()
    tmp = path.parent / f'.{path.name}.tmp'
    try:
      tmp.write_text(json.dumps(record))
      tmp.replace(path)
    except OSError as e:  # a full disk must not kill training from a side thread
      logging.warning('Could not refresh the lock %s: %s', path, e)
