"""Starts `python ARGS` processes by forking them from an interpreter that has imported
the package's dependencies (see common.BackgroundCli).

  python tests/cli_server.py SOCKET

A CLI process spends ~5 CPU-s importing JAX, flax, orbax and TensorFlow before it does
anything; the tests that signal, kill or race real processes start dozens. This server
imports them once (PRELOAD) and then, for each request on the Unix socket SOCKET, forks
a child that runs the command as `python ARGS` would, with the request's environment,
working directory, stdout and stderr (one or two file descriptors passed with the
request). The child is a real process: it can be signalled and killed by its pid, takes
its own JAX backend (nothing here initialises one) and exits with its own status, which
the server reports on the request's connection once it has reaped it.

Protocol, one connection per child: the client sends one JSON line {"args": [...],
"env": {...}, "cwd": "..."} with the output descriptors (stdout and stderr, or one for
both); the server answers {"pid": PID}\n at once and {"status": CODE}\n when the child
has ended (CODE as subprocess reports it: the exit status, or −N for signal N).
"""

import json
import os
import select
import runpy
import signal
import socket
import sys
import traceback

PRELOAD = ('absl.app', 'ml_collections.config_flags', 'jax', 'flax', 'optax',
           'orbax.checkpoint', 'clu.metric_writers', 'vdm_jax.training.train',
           'vdm_jax.evaluation.evaluate', 'vdm_jax.evaluation.sampling',
           'vdm_jax.codec.tools', 'vdm_jax.original', 'vdm_jax.reporting')


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


def _start_child(request: dict, output_fds: list[int]) -> int:
  pid = os.fork()
  if pid:
    return pid
  code = 1
  try:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
      signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(request['env'])
    os.chdir(request['cwd'])
    from vdm_jax.runtime import gcs  # pylint: disable=g-import-not-at-top
    gcs.configure_clients()  # its variables were read at import, with the server's env
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(output_fds[0], 1)
    os.dup2(output_fds[-1], 2)
    code = run_as_python(request['args'])
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def serve(path: str) -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name in PRELOAD:
    __import__(name)
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(path)
  listener.listen(16)
  print('ready', flush=True)
  children = {}  # pid: the connection that asked for it
  parent = os.getppid()
  while os.getppid() == parent:  # ends with the test session that started it
    readable, _, _ = select.select([listener], [], [], 0.02)
    if readable:
      conn, _ = listener.accept()
      message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
      while not message.endswith(b'\n'):
        message += conn.recv(1 << 20)
      sys.stdout.flush()
      sys.stderr.flush()
      pid = _start_child(json.loads(message), fds)
      for fd in fds:
        os.close(fd)
      conn.sendall(json.dumps({'pid': pid}).encode() + b'\n')
      children[pid] = conn
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if not pid:
        break
      conn = children.pop(pid, None)
      if conn is not None:
        try:
          conn.sendall(json.dumps({'status': os.waitstatus_to_exitcode(status)}).encode()
                       + b'\n')
        except OSError:
          pass  # the client went away
        conn.close()


if __name__ == '__main__':
  serve(sys.argv[1])
