"""Runs several `python ARGS` commands from one interpreter (see common.run_commands).

  python tests/forked_commands.py COMMANDS.json

COMMANDS.json holds {"commands": [[ARGS...], ...], "out": FOLDER, "timeout": SECONDS}. This
interpreter imports the package's dependencies (JAX, flax, orbax, TensorFlow through
clu: ~6 CPU-s) once; each command then runs in a child forked from it, as `python ARGS`
would run it: `-m MODULE ARGS` through runpy.run_module, `SCRIPT ARGS` through
runpy.run_path, with that argv, its stdout and stderr in FOLDER/I.out and FOLDER/I.err
and its exit status in FOLDER/codes.json. Nothing here initialises a JAX backend, so
each child starts its own, as a fresh process would.
"""

import json
import os
import runpy
import sys
import time
import traceback

PRELOAD = ('absl.app', 'ml_collections.config_flags', 'jax', 'flax', 'optax',
           'orbax.checkpoint', 'clu.metric_writers', 'vdm_jax.training.train',
           'vdm_jax.evaluation.evaluate', 'vdm_jax.evaluation.sampling',
           'vdm_jax.codec.tools', 'vdm_jax.original', 'vdm_jax.reporting')


def _child(args: list[str], out: str, err: str) -> int:
  """Runs one command in this (forked) process; returns its exit status."""
  for fd, path in ((1, out), (2, err)):
    os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
  return run_as_python(args)


def run_as_python(args: list[str]) -> int:
  """Runs `python ARGS` in this process (a forked child); returns its exit status."""
  try:
    if args[0] == '-m':
      sys.argv = [args[1], *args[2:]]
      sys.path[0] = os.getcwd()  # as `python -m` sets it
      runpy.run_module(args[1], run_name='__main__', alter_sys=True)
    else:
      sys.argv = list(args)
      sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python SCRIPT` sets it
      runpy.run_path(args[0], run_name='__main__')
    return 0
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)  # sys.exit('message'), as the interpreter does
    return 1
  except BaseException:  # pylint: disable=broad-except  # as the interpreter reports it
    traceback.print_exc()
    return 1


def _wait(pid: int, timeout: float) -> int:
  deadline = time.monotonic() + timeout
  while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
      return os.waitstatus_to_exitcode(status)
    if time.monotonic() > deadline:
      os.kill(pid, 9)
      os.waitpid(pid, 0)
      return -9
    time.sleep(0.02)


def main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  # This checkout's package, preloaded, not an installed one (`pip install -e` of
  # another checkout): the children run what sys.modules holds.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name in PRELOAD:
    __import__(name)
  codes = []
  for i, args in enumerate(spec['commands']):
    out, err = (os.path.join(spec['out'], f'{i}.{s}') for s in ('out', 'err'))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        code = _child(args, out, err)
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # pylint: disable=protected-access
    codes.append(_wait(pid, spec['timeout']))
  with open(os.path.join(spec['out'], 'codes.json'), 'w') as f:
    json.dump(codes, f)


if __name__ == '__main__':
  main(sys.argv[1])
