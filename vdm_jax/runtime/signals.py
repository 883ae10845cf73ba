"""SIGTERM and SIGINT: whenever they come, a command stops cleanly with exit status 75.

The command line records them from its first line on (vdm_jax/main.py), and once its
modules are loaded lets them raise errors.Stopped (`stop_at_once`): nothing was saved,
nothing is left behind. Training defers them (`Deferred`) from before it takes the
workdir's lock until it lets it go: a signal before the first step stops the run
there, one during training after the step in flight and its checkpoint
(vdm_jax/training/train.py).

Only the standard library and absl's logging are imported here, so that
vdm_jax/main.py can install a handler before it loads JAX.
"""

import signal
import threading
from typing import Optional

from absl import logging

from vdm_jax import errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _raise_stopped(signum, frame):
  del frame
  raise errors.Stopped(signum)


def stop_at_once() -> None:
  """From now on SIGTERM/SIGINT raise errors.Stopped in the main thread, wherever it is."""
  for sig in SIGNALS:
    signal.signal(sig, _raise_stopped)


class Deferred:
  """Records SIGTERM/SIGINT for the code to act on at a safe point (`signum`).

  A context manager (the previous handlers are restored on exit), or installed for the
  rest of the process with `install()`. A second SIGINT raises KeyboardInterrupt at once.
  Handlers can only be installed from the main thread; elsewhere nothing is installed.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}

  def install(self) -> 'Deferred':
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous.setdefault(sig, signal.signal(sig, self._handle))
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signum = signum
    logging.warning('Received signal %d: stopping once the step in flight is done and '
                    'saved (or before the first step).', signum)

  def __enter__(self) -> 'Deferred':
    return self.install()

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
