"""Workdirs in Google Cloud Storage (`gs://BUCKET/PATH`): the clients that reach the
bucket, and what stands in for the file-system operations an object store lacks.

One way to the bucket, the same in production and against the storage emulator that
the tests run (fake-gcs-server):
  files      config.json, results, PNGs, TensorBoard events and orbax's metadata go
             through etils.epath's fsspec backend, gcsfs (TensorFlow's gfile, epath's
             other backend, cannot be pointed at an emulator);
  arrays     of checkpoints go through TensorStore's gcs driver (orbax);
  the lock   goes through google-cloud-storage's conditional uploads.
All three use Application Default Credentials; STORAGE_EMULATOR_HOST sends all three
to an emulator instead (configure_clients).

GCS has no exclusive create and no rename. An exclusive create is an upload on the
condition that no generation of the object exists (ifGenerationMatch=0); replacing an
object that another process may replace too is an upload on the condition that its
generation is still the one read. Renaming a folder (setting a damaged checkpoint
aside) copies each object and then deletes the originals (fsspec's move), so an
interrupted move leaves the objects in one place or both, never in neither.
"""

import errno
import os
import re
from typing import Optional

from vdm_jax import errors

SCHEME = 'gs://'
# Lock operations give up after this long (the lock goes stale instead; see workdir_lock).
LOCK_RETRY_SECONDS = 20.0
ACCESS_RETRY_SECONDS = 20.0  # the check of credentials and bucket before a run


class StorageError(errors.InputError, OSError):
  """A bucket that cannot be used (credentials, existence, permission, connection)."""


def configure_clients(environ=os.environ) -> None:
  """Chooses the clients above through the variables they read on first use.

  EPATH_USE_TF=false: epath uses gcsfs, not TensorFlow's gfile, for gs:// paths.
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's plain JSON-API client (its
    experimental layer looks each bucket's type up over gRPC before every operation).
  With STORAGE_EMULATOR_HOST set (gcsfs and google-cloud-storage read it), TensorStore
  is sent to the same emulator (TENSORSTORE_GCS_HTTP_URL) with a dummy token.
  Variables already set are left as they are. Runs on import of this module, which
  vdm_jax/runtime/workdir.py imports before any path is opened.

  gcsfs's cache of folder listings is turned off (fsspec's config, unless set there):
  it never learns of objects that TensorStore or another process writes (checkpoints,
  results), and a listing from it would miss them for the life of the process.
  """
  import fsspec.config  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)
  environ.setdefault('EPATH_USE_TF', 'false')
  environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  emulator = environ.get('STORAGE_EMULATOR_HOST')
  if emulator:
    url = emulator if '://' in emulator else f'http://{emulator}'
    environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
    environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')


configure_clients()


def is_gcs(path) -> bool:
  return str(path).startswith(SCHEME)


def split(path) -> tuple[str, str]:
  """('BUCKET', 'PATH') of gs://BUCKET/PATH."""
  bucket, _, name = str(path)[len(SCHEME):].partition('/')
  return bucket, name.strip('/')


def _client():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client(project=None)  # object operations need no project


def _retry(seconds: float):
  from google.cloud.storage import retry  # pylint: disable=g-import-not-at-top
  return retry.DEFAULT_RETRY.with_timeout(seconds)


# --------------------------------------------------------------- access
def _credentials_hint() -> str:
  return ('On a TPU or Compute Engine VM the VM\'s service account is used; elsewhere run '
          '`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS '
          'to a service-account key file (STORAGE_EMULATOR_HOST=http://HOST:PORT uses a '
          'storage emulator instead).')


def check_access(path, flag: str = '--workdir') -> None:
  """Raises StorageError naming `flag` unless the bucket of `path` can be listed.

  Catches, before anything expensive runs, what would otherwise surface deep inside
  orbax or TensorStore: no credentials, no such bucket, no permission, no connection.
  """
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  bucket, name = split(path)
  where = f'{flag}={path}'
  if not bucket:
    raise StorageError(f'{where} names no bucket; write gs://BUCKET/PATH.')
  try:
    blobs = _client().list_blobs(bucket, prefix=name, max_results=1,
                                 retry=_retry(ACCESS_RETRY_SECONDS), timeout=10)
    next(iter(blobs), None)
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise StorageError(f'{where}: no Google Cloud credentials were found. '
                       f'{_credentials_hint()}') from e
  except exceptions.NotFound as e:
    raise StorageError(
        f'{where}: the bucket gs://{bucket} does not exist. Create it (`gcloud storage '
        f'buckets create gs://{bucket}`, in the region of your TPUs) or correct '
        f'{flag}.') from e
  except (exceptions.Forbidden, exceptions.Unauthorized,
          google.auth.exceptions.RefreshError) as e:
    raise StorageError(
        f'{where}: the credentials in use may not list gs://{bucket} ({_first_line(e)}). '
        'Grant them roles/storage.objectAdmin on the bucket, or use other credentials. '
        f'{_credentials_hint()}') from e
  except Exception as e:  # pylint: disable=broad-except
    if not _is_storage_error(e):
      raise
    raise StorageError(f'{where}: {_unreachable(e)}') from e


# ------------------------------------------------------------- the lock
class LockObject:
  """One small object changed only by conditional uploads: the workdir lock on gs://.

  `generation` is that of this process's last write; None before one.
  """

  def __init__(self, path):
    bucket, name = split(path)
    self.path = str(path)
    self.generation: Optional[int] = None
    self._blob = _client().bucket(bucket).blob(name)

  def create(self, data: bytes) -> bool:
    """Writes `data` unless the object exists (ifGenerationMatch=0); False if it did."""
    return self._upload(data, 0)

  def read(self) -> tuple[Optional[bytes], Optional[int]]:
    """(content, generation), or (None, None) when there is no object."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._blob.bucket.blob(self._blob.name)
    try:
      data = blob.download_as_bytes(retry=_retry(LOCK_RETRY_SECONDS))
    except exceptions.NotFound:
      return None, None
    return data, blob.generation

  def replace(self, data: bytes, generation: int) -> bool:
    """Writes `data` if the object is still at `generation`; False if it changed."""
    return self._upload(data, generation)

  def delete(self) -> None:
    """Deletes the object if it is still at our generation; one try, no retries."""
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self._blob.delete(if_generation_match=self.generation, retry=None, timeout=5)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass

  def _upload(self, data: bytes, generation: int) -> bool:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self._blob.upload_from_string(data, content_type='application/json',
                                    if_generation_match=generation,
                                    retry=_retry(LOCK_RETRY_SECONDS))
    except exceptions.PreconditionFailed:
      return False
    self.generation = self._blob.generation
    return True


# --------------------------------------------------------------- faults
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED,
                     errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}
# How TensorStore (and orbax, wrapping it) words a failed request to the bucket.
_TENSORSTORE_FAULT = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|UNAUTHENTICATED|'
                                r'PERMISSION_DENIED)\b|Couldn\'t connect|CURL error')


def _is_storage_error(exc: BaseException) -> bool:
  """Whether `exc` is a failure to reach or use the bucket, by any of the three clients."""
  import aiohttp  # pylint: disable=g-import-not-at-top
  from gcsfs import retry as gcsfs_retry  # pylint: disable=g-import-not-at-top
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  import requests  # pylint: disable=g-import-not-at-top
  kinds = (aiohttp.ClientError, gcsfs_retry.HttpError, exceptions.GoogleAPIError,
           google.auth.exceptions.GoogleAuthError, requests.RequestException)
  for e in errors.causes(exc):
    if isinstance(e, kinds) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS):
      return True
    if _TENSORSTORE_FAULT.search(str(e)):
      return True
  return False


def _first_line(exc: BaseException) -> str:
  text = str(exc).strip().splitlines()
  return f'{type(exc).__name__}: {text[0][:300]}' if text else type(exc).__name__


def _endpoint() -> str:
  return os.environ.get('STORAGE_EMULATOR_HOST') or 'storage.googleapis.com'


def _unreachable(exc: BaseException) -> str:
  innermost = list(errors.causes(exc))[-1]
  return (f'Google Cloud Storage ({_endpoint()}) could not be reached or refused the '
          f'request ({_first_line(innermost)}).')


def describe_fault(exc: BaseException, workdir: Optional[str]) -> Optional[str]:
  """The user's message for a storage failure during a run on gs://; None otherwise."""
  involved = is_gcs(workdir or '') or any(SCHEME in str(e) for e in errors.causes(exc))
  if not involved or not _is_storage_error(exc):
    return None
  return (f'{_unreachable(exc)} The run stopped after the clients\' retries; every '
          'checkpoint that was complete before is intact (orbax marks a checkpoint on gs:// '
          'complete only after all its files are written). Check the network, the '
          'credentials and the bucket, then run the same command again: training resumes '
          'from the newest complete checkpoint.')
