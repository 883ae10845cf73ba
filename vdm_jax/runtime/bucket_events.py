"""TensorBoard events for a workdir on gs:// (vdm_jax/runtime/workdir.py's writer)."""

import pathlib
import tempfile
import time

from clu import metric_writers
from etils import epath


class BucketSummaryWriter(metric_writers.SummaryWriter):
  """TensorBoard events for a workdir on gs://, where objects cannot be appended to.

  TensorFlow writes them to a local temporary folder; its files are uploaded whole on
  every flush and at most UPLOAD_SECONDS after a write (TensorFlow's own writer flushes
  every 120 s), and the folder is deleted on close.
  """

  UPLOAD_SECONDS = 120.0

  def __init__(self, workdir: epath.Path):
    self._local = tempfile.TemporaryDirectory(prefix='vdm_jax-events-')
    self._remote = workdir
    self._uploaded = {}  # name: size uploaded
    self._last = time.monotonic()
    super().__init__(self._local.name)

  def _upload(self) -> None:
    for file in sorted(pathlib.Path(self._local.name).iterdir()):
      size = file.stat().st_size
      if self._uploaded.get(file.name) != size:
        (self._remote / file.name).write_bytes(file.read_bytes())
        self._uploaded[file.name] = size
    self._last = time.monotonic()

  def write_scalars(self, step, scalars):
    super().write_scalars(step, scalars)
    if time.monotonic() - self._last > self.UPLOAD_SECONDS:
      self.flush()

  def flush(self):
    super().flush()
    self._upload()

  def close(self):
    super().close()
    try:
      self._upload()
    finally:
      self._local.cleanup()
