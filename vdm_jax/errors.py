"""The faults a user can fix, as exception types; vdm_jax/reporting.py turns them into
one paragraph and an exit status.

Every module raises these (or subclasses of InputError), so this module imports nothing
of the package.
"""

import signal

INPUT_ERROR_EXIT_CODE = 2  # a fault of input or environment; the message says what to fix
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request; run the same command again


class InputError(Exception):
  """A fault of input or environment (config, flags, data, checkpoint, workdir, file).

  Its message names the file, field or flag and says what to do; the command line
  prints it without a traceback and exits with INPUT_ERROR_EXIT_CODE.
  """


class StorageLost(InputError):
  """The workdir's storage stopped answering (a save or the lock's heartbeat went past
  training.storage_timeout); the run stopped with its complete checkpoints intact.

  Threads of the storage clients may still be waiting on it, so the command line exits
  without waiting for them.
  """


class NonFiniteError(InputError, FloatingPointError):
  """A non-finite loss, gradient or bound; nothing non-finite was saved."""


class Preempted(Exception):
  """Training stopped on SIGTERM/SIGINT after writing a checkpoint."""

  def __init__(self, step: int, workdir):
    super().__init__(f'Stopped by signal at step {step}; checkpoint written to '
                     f'{workdir.checkpoint_dir}. Run the same command again to continue.')
    self.step = step


class Stopped(BaseException):
  """Stopped by SIGTERM/SIGINT before anything was saved (vdm_jax/runtime/signals.py).

  A BaseException, like KeyboardInterrupt, so that no `except Exception` takes it for a
  fault of what it interrupts (a checkpoint being restored, say).
  """

  def __init__(self, signum=None):
    name = signal.Signals(signum).name if signum else 'a signal to another process'
    super().__init__(f'Stopped by {name} before anything was saved; nothing was changed. '
                     'Run the same command again.')
    self.signum = signum


def causes(exc: BaseException):
  """`exc` and the exceptions it was raised from or during, innermost last (libraries
  such as orbax and TensorStore wrap the error that says what happened)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ or exc.__context__
