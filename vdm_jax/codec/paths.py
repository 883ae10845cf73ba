"""--input and --output of the codec commands: checked before any work; the output is
written beside its place and moved there only once complete, and never replaces an
existing file unless --overwrite.

Either may be in a bucket (gs://BUCKET/PATH, reached as vdm_jax/runtime/gcs.py
describes): an input there is copied to a local temporary folder first (local_input);
an output there is written to a local temporary folder and then uploaded, each file as
one object, which GCS makes visible only once complete.
"""

import contextlib
import errno
import os
import shutil
import tempfile
import uuid

from etils import epath

from vdm_jax.codec import file_format
from vdm_jax.runtime import gcs


def _gcs_input_problems(path: str, images: bool) -> list[str]:
  gcs.check_access(path, '--input')
  p = epath.Path(path)
  if not p.exists():
    return [f'--input={path} does not exist.']
  if images and not p.is_dir() and not path.endswith('.npz'):
    return [f'--input={path} is neither a .npz file nor a folder of PNG files.']
  if not images and p.is_dir():
    return [f'--input={path} is a folder; --mode=decompress reads one file written by '
            '--mode=compress.']
  return []


@contextlib.contextmanager
def local_input(path: str):
  """Yields `path`, or for gs:// a local copy of it (a file, or a folder's .png files)."""
  if not gcs.is_gcs(path):
    yield path
    return
  source = epath.Path(path)
  with tempfile.TemporaryDirectory(prefix='vdm_input_') as tmp:
    local = os.path.join(tmp, source.name or 'input')
    if source.is_dir():
      os.mkdir(local)
      for item in source.iterdir():
        if item.name.lower().endswith('.png'):
          with open(os.path.join(local, item.name), 'wb') as f:
            f.write(item.read_bytes())
    else:
      with open(local, 'wb') as f:
        f.write(source.read_bytes())
    yield local


def _input_problems(path: str, images: bool) -> list[str]:
  """What is wrong with --input: images (a .npz or a folder of PNG files), else a file."""
  if gcs.is_gcs(path):
    return _gcs_input_problems(path, images)
  if not os.path.exists(path):
    return [f'--input={path} does not exist.']
  if images and not os.path.isdir(path) and not path.endswith('.npz'):
    return [f'--input={path} is neither a .npz file nor a folder of PNG files.']
  if not images and os.path.isdir(path):
    return [f'--input={path} is a folder; --mode=decompress reads one file written by '
            '--mode=compress.']
  if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
    return [f'--input={path} cannot be read (permission denied).']
  return []


class Output:
  """--output: one file, or (folder=True) a folder of files.

  example: a file name to suggest when --output names a folder instead of a file.
  """

  def __init__(self, path: str, *, folder: bool, overwrite: bool, example: str):
    self.path, self.folder, self.overwrite, self.example = path, folder, overwrite, example
    self.remote = gcs.is_gcs(path)
    self.parent = None if self.remote else os.path.dirname(os.path.abspath(path))

  def problems(self, input_path: str) -> list[str]:
    if self.remote:
      return self._remote_problems(input_path)
    p = self.path
    if os.path.abspath(p) == os.path.abspath(input_path) or (
        os.path.exists(p) and os.path.exists(input_path) and os.path.samefile(p, input_path)):
      return [f'--output={p} is the --input: writing it would destroy the input. Choose '
              'another --output.']
    if not os.path.isdir(self.parent):
      return [f'--output={p}: the folder {self.parent} does not exist. Create it, or choose '
              'another --output.']
    if not self.folder and os.path.isdir(p):
      return [f'--output={p} is a folder; name a file, e.g. '
              f'--output={os.path.join(p, self.example)}.']
    if self.folder and os.path.exists(p) and not os.path.isdir(p):
      return [f'--output={p} is a file; decoded PNG files go to a folder (or name a .npz '
              'file).']
    return self._taken_problems()

  def _remote_problems(self, input_path: str) -> list[str]:
    p = self.path
    if p.rstrip('/') == input_path.rstrip('/'):
      return [f'--output={p} is the --input: writing it would destroy the input. Choose '
              'another --output.']
    gcs.check_access(p, '--output')
    target = epath.Path(p)
    if not self.folder and target.is_dir():
      return [f'--output={p} is a folder; name a file, e.g. '
              f'--output={p.rstrip("/")}/{self.example}.']
    if self.folder and target.exists() and not target.is_dir():
      return [f'--output={p} is a file; decoded PNG files go to a folder (or name a .npz '
              'file).']
    return self._taken_problems()

  def _taken_problems(self) -> list[str]:
    if not self.overwrite and self._taken():
      what = 'is a folder that holds files' if self.folder else 'exists'
      return [f'--output={self.path} {what}; choose another --output, or pass --overwrite '
              f'to replace {"its files of the same names" if self.folder else "it"}.']
    return []

  def _taken(self) -> bool:
    if self.remote:
      target = epath.Path(self.path)
      return (target.is_dir() and any(True for _ in target.iterdir())) if self.folder else (
          target.exists())
    return os.path.isdir(self.path) and bool(os.listdir(self.path)) if self.folder else (
        os.path.lexists(self.path))

  @contextlib.contextmanager
  def writing(self):
    """Yields a new temporary file (or folder) beside --output, made at once so that a
    place that cannot be written is reported before any work; moves it to --output when
    the block completes, and removes it when the block fails. On gs:// the temporary
    file is local, and uploaded when the block completes."""
    if self.remote:
      with tempfile.TemporaryDirectory(prefix='vdm_output_') as folder:
        tmp = os.path.join(folder, 'output')
        if self.folder:
          os.mkdir(tmp)
        with self._disk_full_named(f'the local disk of its temporary copy {folder}'):
          yield tmp
        self._upload(tmp)
      return
    tmp = os.path.join(self.parent, f'.{os.path.basename(self.path)}.{uuid.uuid4().hex[:8]}.tmp')
    try:
      if self.folder:
        os.mkdir(tmp)
      else:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except OSError as e:
      raise file_format.CodecError(
          f'--output={self.path} cannot be written: {e.strerror} ({self.parent}). Make the '
          'folder writable, or choose another --output.') from e
    try:
      with self._disk_full_named(f'the disk holding {self.parent}'):
        yield tmp
        self._move(tmp)
    except BaseException:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
      elif os.path.lexists(tmp):
        os.unlink(tmp)
      raise

  @contextlib.contextmanager
  def _disk_full_named(self, disk: str):
    """A full disk while the output is written: a CodecError naming --output."""
    try:
      yield
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      raise file_format.CodecError(
          f'--output={self.path} cannot be written: {disk} is full ({e.strerror}); '
          'nothing was written there. Free space, or choose another --output.') from e

  def _check_still_free(self) -> None:
    if not self.overwrite and self._taken():
      raise file_format.CodecError(f'--output={self.path} appeared while this command ran; '
                                   'nothing was written. Choose another --output.')

  def _upload(self, tmp: str) -> None:
    self._check_still_free()
    target = epath.Path(self.path)
    files = ([(os.path.join(tmp, n), target / n) for n in sorted(os.listdir(tmp))]
             if self.folder else [(tmp, target)])
    for local, remote in files:
      with open(local, 'rb') as f:
        remote.write_bytes(f.read())

  def _move(self, tmp: str) -> None:
    self._check_still_free()
    if not self.folder or not os.path.isdir(self.path):
      os.replace(tmp, self.path)
      return
    for name in sorted(os.listdir(tmp)):
      os.replace(os.path.join(tmp, name), os.path.join(self.path, name))
    os.rmdir(tmp)


def check(input_path: str, output: Output, *, images: bool) -> None:
  """Raises a CodecError listing every problem of --input and --output, before any work.

  images: --input holds images (compress); otherwise a compressed file (decompress).
  """
  problems = _input_problems(input_path, images) + output.problems(input_path)
  if problems:
    raise file_format.CodecError(' '.join(problems) + ' Nothing was written.')
