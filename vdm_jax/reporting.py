"""How faults reach a user of the command line: one paragraph and an exit status, not a
traceback.

Faults of input or environment (a bad config, flag, data file, checkpoint or workdir,
a full or read-only disk, a diverging run) exit with status 2 and a message that names
the file, field or process and says what to do; a command stopped by SIGTERM/SIGINT
exits with 75 (training after its checkpoint, anything else with nothing changed).
`--verbose` (or VDM_JAX_TRACEBACK=1) adds the traceback.
Anything else is a bug and raises as usual.
"""

import contextlib
import errno
import os
import sys
import traceback
from typing import Optional

from vdm_jax import errors
from vdm_jax.runtime import gcs
from vdm_jax.runtime import workdir as workdir_lib

_exit_now = os._exit  # pylint: disable=protected-access  # replaced in tests


def _show_traceback(verbose: bool) -> bool:
  return verbose or os.environ.get('VDM_JAX_TRACEBACK', '') not in ('', '0')


def exit_with(message: str, verbose: bool = False, exc: Optional[BaseException] = None,
              code: int = errors.INPUT_ERROR_EXIT_CODE, at_once: bool = False):
  """Prints `error: message` (and the traceback when asked) and exits with `code`.

  at_once skips the interpreter's shutdown: after a failed asynchronous save, orbax's
  and tensorstore's threads would print tracebacks of their closed event loops there.
  """
  if exc is not None and _show_traceback(verbose):
    traceback.print_exception(exc)
  print(f'error: {message}', file=sys.stderr)
  if at_once and not _show_traceback(verbose):
    sys.stdout.flush()
    sys.stderr.flush()
    _exit_now(code)
  sys.exit(code)


def stop_process(message: str) -> None:
  """Prints `error: message` and ends the process at once with exit status 2, from any
  thread (the lock's watchdog: the main thread may be blocked on the storage)."""
  print(f'error: {message}', file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  _exit_now(errors.INPUT_ERROR_EXIT_CODE)


def _is_late_loop_callback(exc_type, exc, tb) -> bool:
  """A callback into an asyncio loop that was already closed (see quiet_late_callbacks)."""
  if exc_type is not RuntimeError or str(exc) != 'Event loop is closed':
    return False
  return any(frame.name == 'call_soon_threadsafe' for frame in traceback.extract_tb(tb))


def quiet_late_callbacks() -> None:
  """Stops tensorstore printing a traceback per write still in flight when a save fails.

  When one write of an orbax save fails (a full disk), orbax closes the save's asyncio
  loop while tensorstore still has writes in flight; each of them, on completing, calls
  `loop.call_soon_threadsafe` on the closed loop, and tensorstore reports the RuntimeError
  as unraisable (sys.unraisablehook): hundreds of tracebacks before the one-paragraph
  error. Those results have nobody left to receive them, so the hook drops exactly that
  exception and passes every other one on. Process-wide, so it is called by the entry point
  (vdm_jax/main.py), not by the library.
  """
  previous = sys.unraisablehook

  def hook(info):
    if not _is_late_loop_callback(info.exc_type, info.exc_value, info.exc_traceback):
      previous(info)

  sys.unraisablehook = hook


def describe_config_error(exc: BaseException, argv) -> str:
  """A message for an exception raised while loading --config or applying overrides."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path is None:
    i = argv.index('--config') if '--config' in argv else -1
    path = argv[i + 1] if 0 <= i < len(argv) - 1 else '?'
  text = str(exc).replace('\\n', ' ').replace('\\', '').replace("'", '')
  text = ' '.join(text.split()) or type(exc).__name__
  if isinstance(exc, (KeyError, AttributeError)) or 'did you mean' in text.lower():
    return (f'a --config. override names no field of the config {path}: {text}. Each '
            'field is listed, with a comment, in vdm_jax/config_base.py.')
  if isinstance(exc, (FileNotFoundError, IOError)) and not os.path.exists(path):
    return f'--config={path}: no such file. Pass a config file such as configs/mnist.py.'
  return (f'--config={path} could not be loaded ({type(exc).__name__}: {text}). A config '
          'file defines get_config() returning an ml_collections.ConfigDict; an override '
          'must give a value of the field\'s type.')


def _os_error(exc: BaseException) -> Optional[OSError]:
  """The first OSError with an errno in the chain of causes (orbax and TF wrap them)."""
  return next((e for e in errors.causes(exc)
               if isinstance(e, OSError) and e.errno is not None), None)


def _filesystem_message(exc: BaseException, workdir: Optional[str]) -> Optional[str]:
  """A message for a full, read-only or unwritable disk; None for anything else."""
  os_error = _os_error(exc)
  name = type(exc).__name__
  code = os_error.errno if os_error is not None else None
  where = getattr(os_error, 'filename', None) or workdir
  if code == errno.ENOSPC or 'No space left' in str(exc):
    steps = []
    if workdir:
      try:
        steps = workdir_lib.Workdir(workdir).checkpoint_steps()
      except Exception:  # pylint: disable=broad-except
        pass
    kept = (f'the checkpoints written before are intact (newest: step {steps[-1]})'
            if steps else 'no checkpoint had been written yet')
    return (f'the disk holding {where} is full (ENOSPC). The save in progress was '
            f'abandoned; {kept}. Free space (or move --workdir to a larger disk) and run '
            'the same command again: it resumes from the newest checkpoint.')
  in_workdir = workdir is not None and os.path.abspath(str(where)).startswith(
      os.path.abspath(workdir))
  if code in (errno.EACCES, errno.EPERM, errno.EROFS) or name == 'PermissionDeniedError':
    fix = ('Make the workdir writable or choose another --workdir; nothing in it was '
           'changed.' if in_workdir else 'Make it writable, or name another path.')
    return (f'cannot write to {where}: permission denied or read-only file system '
            f'({exc}). {fix}')
  if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
    what = '--workdir' if in_workdir else 'path'
    return (f'{where}: {os_error.strerror}; a part of that path is a file, not a folder '
            f'(or the other way round). Choose another {what}.')
  return None


@contextlib.contextmanager
def reported(verbose: bool = False, workdir: Optional[str] = None):
  """Turns faults of input or environment into `error: …` and an exit status."""
  user_errors = (errors.InputError, FileNotFoundError, FileExistsError)
  try:
    yield
  except errors.Preempted as e:
    exit_with(str(e), verbose, e, code=errors.PREEMPTED_EXIT_CODE)
  except errors.Stopped as e:  # raised wherever the program was: skip its threads' shutdown
    exit_with(str(e), verbose, e, code=errors.PREEMPTED_EXIT_CODE, at_once=True)
  except user_errors as e:  # the storage's clients may still wait on it: no shutdown
    exit_with(str(e), verbose, e, at_once=isinstance(e, errors.StorageLost))
  except Exception as e:  # pylint: disable=broad-except
    message = _filesystem_message(e, workdir) or gcs.describe_fault(e, workdir)
    if message is None:
      raise
    exit_with(message, verbose, e, at_once=True)
