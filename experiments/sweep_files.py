"""A sweep's files, on local disk or on a bucket (gs://BUCKET/PATH), through etils.epath."""

import importlib
import json


def path(location: str):
  """`location` (local, or gs://BUCKET/PATH) as an etils.epath.Path."""
  if location.startswith('gs://'):  # vdm_jax.runtime.gcs chooses epath's client for gs://
    importlib.import_module('vdm_jax.runtime.gcs')
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(location)


def write_text(file, text: str) -> None:
  """Replaces `file` (an epath.Path) whole: locally through a temporary file renamed
  into place; on gs:// an upload replaces an object whole."""
  if str(file).startswith('gs://'):
    file.write_text(text)
    return
  tmp = file.parent / (file.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(file)


def read_json(file) -> dict:
  """The JSON object in `file` (an epath.Path); {} if absent, unreadable or not an object."""
  try:
    value = json.loads(file.read_text())
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}
