"""The workdir: one fixed folder per run, and the only code that reads or writes it.

  WORKDIR/config.json            the resolved config of the run (process 0 writes it)
  WORKDIR/checkpoints/<step>/    orbax checkpoints (vdm_jax/runtime/checkpoints.py)
  WORKDIR/phema/<step>/          snapshots of the EMA profiles (docs/maths.md §14)
  WORKDIR/phema_results*.json    the post-hoc EMA's curve (--mode=phema), and its plot
  WORKDIR/eval_results*.json     evaluations (latest, and one per step)
  WORKDIR/samples_<step>.png     sample grids
  WORKDIR/lock.json              the owner of a training run (vdm_jax/runtime/workdir_lock.py)
  WORKDIR/events.out.tfevents.*  TensorBoard (clu's writer)

Every path goes through etils.epath, so a workdir may be a local folder or a bucket
(`gs://BUCKET/PATH`, reached as vdm_jax/runtime/gcs.py describes).
"""

import errno
import io
import json
from typing import Optional
import uuid

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vdm_jax import errors
from vdm_jax.runtime import gcs

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
PHEMA_DIR = 'phema'
RESULTS_FILE = 'eval_results.json'


class WorkdirError(errors.InputError, ValueError):
  """The workdir cannot be used as it is; the message says what to do."""


def _atomic_write(path: epath.Path, data: bytes) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it into place (on
  gs:// an upload replaces an object whole, so it is written in place)."""
  if gcs.is_gcs(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f'.{path.name}.tmp'
  tmp.write_bytes(data)
  tmp.replace(path)


class Workdir:
  """A run's folder: config.json, checkpoints, results and samples."""

  def __init__(self, path):
    self.path = epath.Path(path)
    self.checkpoint_dir = self.path / CHECKPOINT_DIR
    self.phema_dir = self.path / PHEMA_DIR

  def __repr__(self) -> str:
    return f'Workdir({str(self.path)!r})'

  def __str__(self) -> str:
    return str(self.path)

  # ------------------------------------------------------------- existence
  def create(self) -> None:
    """Makes the folder (training, import); a clear error where that is impossible."""
    self.check_access()
    if self.path.exists() and not self.path.is_dir():
      raise WorkdirError(f'--workdir={self.path} is a file, not a folder; choose another '
                         '--workdir (or move the file aside).')
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
      raise WorkdirError(f'--workdir={self.path} cannot be created: a part of that path is '
                         f'a file ({e}); choose another --workdir.') from e
    except OSError as e:
      if e.errno != errno.ENAMETOOLONG:
        raise
      raise WorkdirError(f'--workdir={self.path} cannot be created: {e.strerror} (a name '
                         'in that path is longer than the file system allows, 255 bytes on '
                         'most); choose a shorter --workdir.') from e

  def check_writable(self) -> None:
    """Writes and removes a file in the workdir and in checkpoints/ (if present), so that
    a run that could not save is refused before it starts (process 0 only)."""
    if jax.process_index() != 0:
      return
    for folder in (self.path, self.checkpoint_dir):
      if not folder.is_dir():
        continue
      probe = folder / f'.write_test.{uuid.uuid4().hex[:8]}'
      try:
        probe.write_bytes(b'')
        probe.unlink()
      except OSError as e:
        raise WorkdirError(
            f'cannot write to {folder} ({getattr(e, "strerror", None) or e}): this run '
            'could not save its checkpoints. Make it writable (or choose another '
            '--workdir); nothing in it was changed.') from e

  def require(self) -> None:
    """For eval, sample and the codec: the folder must exist; nothing is created."""
    self.check_access()
    if not self.path.is_dir():
      raise WorkdirError(f'--workdir={self.path} does not exist or is not a folder: train '
                         'there first (--mode=train), import a checkpoint there '
                         '(--mode=import_original), or point --workdir at a trained run.')

  def check_access(self) -> None:
    """On gs://: credentials and bucket usable (gcs.StorageError otherwise)."""
    if gcs.is_gcs(self.path):
      gcs.check_access(self.path)

  # ---------------------------------------------------------------- config
  def read_config(self) -> Optional[dict]:
    """The saved config.json as a dict, or None if there is none."""
    path = self.path / CONFIG_FILE
    if not path.exists():
      return None
    fix = (f'it describes the run whose checkpoints are in {self.checkpoint_dir}. Restore '
           'it from a copy, or delete it to have this run write the current config there '
           "(only if the current config is the run's).")
    try:
      saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise WorkdirError(f'{path} is not valid JSON ({e}); {fix}') from e
    if not isinstance(saved, dict):
      raise WorkdirError(f'{path} holds a JSON {type(saved).__name__}, not the object of '
                         f'config fields it should hold; {fix}')
    return saved

  def write_config(self, config) -> None:
    """Saves the resolved config (process 0 only)."""
    if jax.process_index() == 0:
      _atomic_write(self.path / CONFIG_FILE,
                    config.to_json_best_effort(indent=2, sort_keys=True).encode())

  # ----------------------------------------------------------- checkpoints
  def checkpoint_steps(self) -> list[int]:
    """Steps of the finalised checkpoints (orbax's step folders)."""
    if not self.checkpoint_dir.is_dir():
      return []
    return sorted(ocp.utils.checkpoint_steps(self.checkpoint_dir))

  def has_checkpoint(self) -> bool:
    return bool(self.checkpoint_steps())

  # ---------------------------------------------------- results and samples
  def write_results(self, results: dict, step: int, name: str = RESULTS_FILE
                    ) -> epath.Path:
    """NAME.json (latest) and NAME_<step>.json, e.g. eval_results.json (process 0 only)."""
    payload = json.dumps(dict(results, step=int(step)), indent=2, sort_keys=True).encode()
    stem = name.removesuffix('.json')
    if jax.process_index() == 0:
      for file in (f'{stem}_{int(step)}.json', name):
        _atomic_write(self.path / file, payload)
    return self.path / name

  def read_results(self, step: Optional[int] = None) -> Optional[dict]:
    name = RESULTS_FILE if step is None else f'eval_results_{int(step)}.json'
    path = self.path / name
    return json.loads(path.read_text()) if path.exists() else None

  def write_file(self, name: str, data: bytes) -> epath.Path:
    """Writes WORKDIR/NAME atomically (process 0 only)."""
    if jax.process_index() == 0:
      _atomic_write(self.path / name, data)
    return self.path / name

  def samples_path(self, step: int) -> epath.Path:
    return self.path / f'samples_{int(step)}.png'

  def write_png(self, path: epath.Path, image: np.ndarray, scale: int = 1) -> epath.Path:
    """Writes a uint8 [H, W, C] image as PNG at `path` (process 0 only)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
      buffer = io.BytesIO()
      pil.save(buffer, format='PNG')
      _atomic_write(path, buffer.getvalue())
    return path

  # ----------------------------------------------------------- TensorBoard
  def metric_writer(self, just_logging: bool = False):
    """clu's default writer (a clu.metric_writers.MetricWriter): the log, and
    TensorBoard events in the workdir.

    clu's writers import TensorFlow (~5 CPU-s), so they are imported here, by the
    commands that write events, and not by those that do not (compress, decompress).
    """
    # pylint: disable=g-import-not-at-top
    from clu import metric_writers
    from vdm_jax.runtime import bucket_events
    # pylint: enable=g-import-not-at-top
    if just_logging or not gcs.is_gcs(self.path):
      return metric_writers.create_default_writer(str(self.path), just_logging=just_logging)
    return metric_writers.AsyncMultiWriter([metric_writers.LoggingWriter(),
                                            bucket_events.BucketSummaryWriter(self.path)])
