"""Shared helpers for the tests: tiny models and parameter perturbation."""

import pathlib
import re
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from vdm_jax import config_base
from vdm_jax.model import vdm


def tiny_model_config(**overrides) -> ml_collections.ConfigDict:
  """A small `config.model` for fast tests (8 channels, 1 block, 4 groups)."""
  cfg = config_base.get_config().model
  cfg.n_embd = 8
  cfg.n_layer = 1
  cfg.groupnorm_groups = 4
  cfg.fourier_n_min = 1
  cfg.fourier_n_max = 2
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The base `config.data` with overrides, e.g. data_config(dataset='digits')."""
  cfg = config_base.get_config().data
  for name, value in overrides.items():
    cfg[name] = value
  return cfg


def take(iterator, n: int) -> list:
  return list(__import__('itertools').islice(iterator, n))


def rngs(seed: int = 0) -> dict:
  k = jax.random.split(jax.random.key(seed), 3)
  return {'params': k[0], 'sample': k[1], 'dropout': k[2]}


def init_model(model_cfg, shape=(4, 8, 8, 1), seed=0):
  model = vdm.VDM.from_config(model_cfg)
  x = jnp.zeros(shape, jnp.uint8)
  cond = jnp.zeros((shape[0],), jnp.float32)
  variables = jax.jit(model.init)(rngs(seed), x, cond)  # eager init runs op by op: slow
  return model, variables


def perturb(params, key, scale=0.1, predicate=lambda path: True):
  """Adds N(0, scale²) noise to the leaves whose '/'-joined path satisfies `predicate`.

  Zero-initialised output layers make a fresh network the identity ε̂ = z; tests of the
  network's influence need it to compute something.
  """
  # numpy's generator, seeded by the key: jax.random compiles a threefry kernel per leaf
  # shape (~10 s for a U-Net), numpy compiles nothing.
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  def noisy(path, leaf):
    if not predicate('/'.join(str(getattr(p, 'key', p)) for p in path)):
      return leaf
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(np.asarray(leaf) + np.float32(scale) * noise)
  return jax.tree_util.tree_map_with_path(noisy, params)


def bend_nnet_schedule(schedule_params, key, strength=20.0):
  """Makes a learned_nnet schedule strongly non-linear (its l3 term is /1024 at init)."""
  k2, k3, kb = jax.random.split(key, 3)
  p = jax.tree.map(lambda x: x, schedule_params)
  # Steep sigmoids stepping near t = 0.75 (input 2t − 1 ≈ 0.5).
  p['l2'] = {'kernel': 10.0 + jax.random.normal(k2, p['l2']['kernel'].shape),
             'bias': -5.0 + jax.random.normal(kb, p['l2']['bias'].shape)}
  p['l1'] = {'kernel': jnp.full_like(p['l1']['kernel'], 0.5), 'bias': p['l1']['bias']}
  p['l3'] = {'kernel': strength * jnp.abs(jax.random.normal(k3, p['l3']['kernel'].shape))}
  return p


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_experiment(filename: str):
  """The module experiments/FILENAME, imported by name with experiments/ on sys.path, as
  the scripts import each other: each loads once (its absl flags are defined once)."""
  import importlib  # pylint: disable=g-import-not-at-top
  folder = str(REPO / 'experiments')
  if folder not in sys.path:
    sys.path.insert(0, folder)
  return importlib.import_module(filename.removesuffix('.py'))


def load_config(name: str):
  """get_config() of configs/NAME.py."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'configs_{name}', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_python(code: str, devices: int = 1, timeout: int = 600, env=None):
  """Runs `code` in a fresh interpreter with `devices` CPU devices; returns CompletedProcess."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  full_env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}:{REPO / "tests"}',
                  XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                  **(env or {}))
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def run_cli(*args, devices: int = 1, timeout: int = 600, env=None):
  """`python -m vdm_jax.main ARGS` in a subprocess; returns CompletedProcess."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  full_env = dict(os.environ, JAX_PLATFORMS='cpu',
                  XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                  **(env or {}))
  return subprocess.run([sys.executable, '-m', 'vdm_jax.main', *args], cwd=REPO,
                        env=full_env, capture_output=True, text=True, timeout=timeout)


def params_of(workdir, config, which='params'):
  """The newest checkpoint's params (or ema_params) as numpy, restored on 1 device."""
  from vdm_jax import build  # pylint: disable=g-import-not-at-top
  _, state = build.restore(config, str(workdir))
  return jax.tree.map(lambda x: __import__('numpy').asarray(x), getattr(state, which))


@__import__('contextlib').contextmanager
def read_only(path):
  """Bind-mounts `path` on itself read-only for the block; skips the test where that is
  not allowed."""
  import pytest  # pylint: disable=g-import-not-at-top
  for command in (['mount', '--bind', str(path), str(path)],
                  ['mount', '-o', 'remount,ro,bind', str(path)]):
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
      subprocess.run(['umount', str(path)], capture_output=True)
      pytest.skip(f'cannot make a read-only mount here: {done.stderr.strip()}')
  try:
    yield path
  finally:
    subprocess.run(['umount', str(path)], check=True)


def mount_tmpfs(path, options):
  """Mounts a tmpfs with `options` (e.g. 'size=64k') at the new folder `path`; skips the
  test where that is not allowed. The test unmounts it."""
  import pytest  # pylint: disable=g-import-not-at-top
  path.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                        capture_output=True)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {done.stderr.decode().strip()}')


def assert_trees_equal(a, b):
  import numpy as np  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def assert_params_close_across_reduction_orders(a, b):
  """Parameters of runs that differ only in the reduction order of their gradients (1 or
  8 devices, 1 or 2 processes).

  Adam divides by √v: where a gradient is float noise (~1e-9), the noise sets the
  sign of a ~lr·0.1 update, so such coordinates may differ by ~1e-5 after a few steps;
  everything else agrees to float32 rounding amplified over a few steps.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=5e-5), a, b)


def run_commands(*commands, devices: int = 1, timeout: int = 600, env=None):
  """Runs each command, in order, as `python ARGS` would, from one interpreter.

  A command is the argument list after `python`: ('-m', 'vdm_jax.main', '--config=…', …)
  or ('experiments/codec_eval.py', …). Each runs in a child forked from an interpreter
  that imported the package's dependencies once (tests/cli_server.py), with its own
  argv, exit status, stdout and stderr, and its own JAX backend: a CLI call without the
  ~5 CPU-s of imports of a fresh interpreter (a fresh interpreter it is where `env`
  changes variables read on import). For commands that run one
  after another; BackgroundCli runs one concurrently, to be signalled or killed.
  Returns one CompletedProcess per command.
  """
  import os, subprocess, sys, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
  full_env = dict(os.environ, JAX_PLATFORMS='cpu',
                  XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
                  **(env or {}))
  server = _server_for(full_env)
  if server is not None:
    results = []
    for command in commands:
      with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = ForkedProcess(server, command, full_env, REPO, (out.fileno(), err.fileno()))
        try:
          code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
          proc.kill()
          code = proc.wait()
        texts = []
        for f in (out, err):
          f.seek(0)
          texts.append(f.read().decode(errors='replace'))
      results.append(subprocess.CompletedProcess([sys.executable, *command], code, *texts))
    return results
  return [subprocess.run([sys.executable, *map(str, command)], cwd=REPO, env=full_env,
                         capture_output=True, text=True, timeout=timeout)
          for command in commands]


# Variables that the preloaded modules of tests/cli_server.py do not read on import: a
# child may have its own (the others must equal the server's, else a fresh interpreter).
_READ_AT_RUN_TIME = ('XLA_FLAGS', 'PYTEST_', 'STORAGE_EMULATOR_HOST', 'TENSORSTORE_',
                     'GOOGLE_')


class _CliServer:
  """tests/cli_server.py, started on first use, once per test process."""

  def __init__(self):
    import atexit, os, shutil, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
    folder = tempfile.mkdtemp(prefix='vdm_cli_')
    self.path = os.path.join(folder, 'socket')
    self.env = dict(os.environ, JAX_PLATFORMS='cpu')
    self.proc = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'cli_server.py'),
                                  self.path], cwd=REPO, env=self.env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    assert self.proc.stdout.readline().strip() == 'ready'
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    atexit.register(self.proc.kill)  # runs first

  def serves(self, env) -> bool:
    def fixed(e):
      return {k: v for k, v in e.items() if not k.startswith(_READ_AT_RUN_TIME)}
    return self.proc.poll() is None and fixed(env) == fixed(self.env)


_SERVER = []


class ForkedProcess:
  """`python ARGS`, forked by tests/cli_server.py: a real process (its own pid, signals,
  exit status), without a fresh interpreter's imports. The parts of subprocess.Popen
  that BackgroundCli uses; stdout and stderr together in `stdout`."""

  def __init__(self, server: _CliServer, args, env, cwd, outputs=None):
    """outputs: file descriptors for stdout and stderr; None: a pipe for both (`stdout`)."""
    import json, os, socket  # pylint: disable=g-import-not-at-top,multiple-imports
    self.stdout = None
    if outputs is None:
      read_end, write_end = os.pipe()
      self.stdout = os.fdopen(read_end, 'r', errors='replace')
      outputs = [write_end]
    self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    self._conn.connect(server.path)
    request = json.dumps(dict(args=[str(a) for a in args], env=env, cwd=str(cwd)))
    socket.send_fds(self._conn, [request.encode() + b'\n'], list(outputs))
    if self.stdout is not None:
      os.close(outputs[0])
    self._buffer = b''
    self.pid = self._message()['pid']
    self.returncode = None

  def _message(self) -> dict:
    import json  # pylint: disable=g-import-not-at-top
    while b'\n' not in self._buffer:
      data = self._conn.recv(4096)
      if not data:
        raise RuntimeError('tests/cli_server.py went away')
      self._buffer += data
    line, self._buffer = self._buffer.split(b'\n', 1)
    return json.loads(line)

  def poll(self):
    import select  # pylint: disable=g-import-not-at-top
    if self.returncode is None and (b'\n' in self._buffer or
                                    select.select([self._conn], [], [], 0)[0]):
      self.returncode = self._message()['status']
    return self.returncode

  def wait(self, timeout=None):
    import select  # pylint: disable=g-import-not-at-top
    if self.returncode is None:
      if b'\n' not in self._buffer and not select.select([self._conn], [], [], timeout)[0]:
        raise subprocess.TimeoutExpired(['pid', self.pid], timeout)
      self.returncode = self._message()['status']
    return self.returncode

  def send_signal(self, sig) -> None:
    import os  # pylint: disable=g-import-not-at-top
    if self.poll() is None:
      try:
        os.kill(self.pid, sig)
      except ProcessLookupError:
        pass  # ended, not yet reported

  def kill(self) -> None:
    import signal  # pylint: disable=g-import-not-at-top
    self.send_signal(signal.SIGKILL)


def _server_for(env):
  """The tests' cli_server when it can run a command with `env` (the server's own,
  bar variables read at run time); else None."""
  if not _SERVER:
    _SERVER.append(_CliServer())
  return _SERVER[0] if _SERVER[0].serves(env) else None


def start_cli(args, env, cwd=REPO):
  """`python ARGS` with stdout and stderr together: forked by tests/cli_server.py when
  the environment allows it, else a fresh interpreter."""
  server = _server_for(env)
  if server is not None:
    return ForkedProcess(server, args, env, cwd)
  return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


class BackgroundCli:
  """`python -m vdm_jax.main --mode=train` in the background, output read line by line."""

  running = []  # the tests kill these at the end of each test, whatever happened

  def __init__(self, workdir, flags, env):
    self.proc = start_cli(['-m', 'vdm_jax.main', '--config=configs/test.py',
                           f'--workdir={workdir}', *flags], env)
    BackgroundCli.running.append(self.proc)
    self.lines = []
    self.times = []  # when each line arrived
    self.done = False
    self._cond = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line)
        self.times.append(time.monotonic())
        self._cond.notify_all()
    with self._cond:
      self.done = True
      self._cond.notify_all()

  def wait_for(self, pattern: str, timeout: float = 300) -> bool:
    """Waits for a line matching `pattern`; False if the process ended first."""
    regex = re.compile(pattern)
    seen = 0
    deadline = time.monotonic() + timeout
    with self._cond:
      while True:
        if any(regex.search(line) for line in self.lines[seen:]):
          return True
        seen = len(self.lines)
        if self.done:
          return False
        left = deadline - time.monotonic()
        assert left > 0, f'timed out waiting for {pattern!r}:\n{self.output[-3000:]}'
        self._cond.wait(left)

  def step_interval(self) -> float:
    """The median time between the metric lines of successive steps so far."""
    with self._cond:
      times = [t for t, line in zip(self.times, self.lines) if '] train/' in line]
    return float(np.median(np.diff(times))) if len(times) > 1 else 0.0

  def send(self, sig) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)

  def finish(self, timeout: float = 300) -> int:
    rc = self.proc.wait(timeout)
    with self._cond:
      self._cond.wait_for(lambda: self.done, timeout)
    return rc

  @property
  def output(self) -> str:
    return ''.join(self.lines)


def reap_background_clis() -> None:
  """Kills the BackgroundCli processes still running (call it at the end of each test)."""
  while BackgroundCli.running:
    proc = BackgroundCli.running.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()
