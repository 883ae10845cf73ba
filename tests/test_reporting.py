"""Tests of vdm_jax.reporting: faults of input or environment become messages and exit 2."""

import asyncio
import errno
import sys
import types

import pytest

from vdm_jax import errors
from vdm_jax import reporting
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax import validation


@pytest.fixture(autouse=True)
def _no_hard_exit(monkeypatch):
  def fake(code):
    raise SystemExit(code)
  monkeypatch.setattr(reporting, '_exit_now', fake)


def _exit(exc, workdir=None, verbose=False):
  with pytest.raises(SystemExit) as e:
    with reporting.reported(verbose=verbose, workdir=workdir):
      raise exc
  return e.value.code


@pytest.mark.parametrize('exc', [
    validation.ConfigError(['config.model.n_embd = 3: must be even']),
    workdir_lib.WorkdirError('x'), checkpoints.CheckpointError('x'),
    errors.NonFiniteError('x'), FileNotFoundError('x'), FileExistsError('x')])
def test_faults_of_input_exit_2_with_the_message_only(exc, capsys):
  assert _exit(exc) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and str(exc) in err and 'Traceback' not in err


def test_verbose_or_the_environment_adds_the_traceback(capsys, monkeypatch):
  assert _exit(workdir_lib.WorkdirError('x'), verbose=True) == 2
  assert 'Traceback' in capsys.readouterr().err
  monkeypatch.setenv('VDM_JAX_TRACEBACK', '1')
  assert _exit(workdir_lib.WorkdirError('x')) == 2
  assert 'Traceback' in capsys.readouterr().err


def test_preemption_exits_75(capsys, tmp_path):
  assert _exit(errors.Preempted(3, workdir_lib.Workdir(tmp_path))) == 75
  assert 'Run the same command again' in capsys.readouterr().err


def test_a_full_disk_deep_in_a_chain_names_the_newest_checkpoint(tmp_path, capsys):
  (tmp_path / 'checkpoints' / '40').mkdir(parents=True)
  try:
    try:
      raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'x'))
    except OSError as inner:
      raise RuntimeError('async save failed') from inner
  except RuntimeError as outer:
    assert _exit(outer, workdir=str(tmp_path)) == 2
  err = capsys.readouterr().err
  assert 'is full (ENOSPC)' in err and 'intact (newest: step 40)' in err


def test_permission_denied_says_nothing_was_changed(capsys):
  assert _exit(PermissionError(errno.EACCES, 'Permission denied', '/ro/lock.json')) == 2
  assert 'cannot write to /ro/lock.json' in capsys.readouterr().err


def test_a_bug_still_raises():
  with pytest.raises(ZeroDivisionError):
    with reporting.reported():
      raise ZeroDivisionError


def _unraisable(exc):
  return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                               exc_traceback=exc.__traceback__, err_msg=None, object=None)


def test_late_callbacks_into_a_closed_loop_are_dropped_and_nothing_else(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  reporting.quiet_late_callbacks()
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(print)
  except RuntimeError as e:
    late = e
  sys.unraisablehook(_unraisable(late))
  assert not seen
  other = [RuntimeError('Event loop is closed'), ValueError('anything else')]
  for exc in other:  # the same text raised elsewhere, and another exception, pass on
    sys.unraisablehook(_unraisable(exc))
  assert [info.exc_value for info in seen] == other
