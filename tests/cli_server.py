"""Starts `python ARGS` processes by forking them from an interpreter that has imported
the package's dependencies (see common.BackgroundCli).

  python tests/cli_server.py SOCKET

A CLI process spends ~5 CPU-s importing JAX, flax, orbax and TensorFlow before it does
anything; the tests that signal, kill or race real processes start dozens. This server
imports them once (forked_commands.PRELOAD) and then, for each request on the Unix
socket SOCKET, forks a child that runs the command as `python ARGS` would, with the
request's environment, working directory and stdout and stderr (one or two file
descriptors passed with the request). The child is a real process: it can be signalled and killed by its
pid, takes its own JAX backend (nothing here initialises one) and exits with its own
status, which the server reports on the request's connection once it has reaped it.

Protocol, one connection per child: the client sends one JSON line {"args": [...],
"env": {...}, "cwd": "..."} with the output descriptors (stdout, stderr; one for both); the server answers
{"pid": PID}\n at once and {"status": CODE}\n when the child has ended (CODE as
subprocess reports it: the exit status, or −N for signal N).
"""

import json
import os
import select
import signal
import socket
import sys

import forked_commands


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
    code = forked_commands.run_as_python(request['args'])
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def serve(path: str) -> None:
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  for name in forked_commands.PRELOAD:
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
