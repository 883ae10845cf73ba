"""Fingerprints of what a codec file depends on: the model, its parameters, the images,
the software and device (vdm_jax/codec/file_format.py stores prefixes of them), and the
fixed seed words of the bits-back stack.
"""

import hashlib
import json
from typing import Any

from importlib import metadata

import jax
import jaxlib
import numpy as np

from vdm_jax import config_base


def digest(*parts: bytes) -> bytes:
  """SHA-256 of the length-prefixed parts (16 bytes; files keep a prefix of it)."""
  h = hashlib.sha256()
  for p in parts:
    h.update(len(p).to_bytes(8, 'little'))
    h.update(p)
  return h.digest()[:16]


# Fields of config.model that came after the files' fingerprint: left out of it while
# they hold their defaults (which compute what the model computed before them), so that
# files written before them still decode.
LATER_FIELDS = ('mulan_latent_draws', 'mulan_latent_classes', 'mulan_hidden',
                'second_order_weight')


def config_hash(model_config) -> bytes:
  """Digest of `config.model` (every field, sorted; LATER_FIELDS only where they differ
  from their defaults): what defines the network."""
  cfg = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  defaults = config_base.get_config().model
  cfg = {k: v for k, v in cfg.items() if k not in LATER_FIELDS or v != defaults[k]}
  return digest(json.dumps(cfg, sort_keys=True, default=repr).encode())


def params_hash(params: Any) -> bytes:
  """Digest of the parameters: each leaf's path, dtype, shape and bytes."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  parts = []
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    parts += [jax.tree_util.keystr(path).encode(), f'{a.dtype}{a.shape}'.encode(),
              a.tobytes()]
  return digest(*parts)


def images_hash(images: np.ndarray) -> bytes:
  a = np.ascontiguousarray(images, dtype=np.int64)
  return digest(str(a.shape).encode(), a.tobytes())


def environment() -> str:
  """What the network outputs depend on besides the model: XLA version and device."""
  device = jax.devices()[0]
  return (f'jax {jax.__version__}; jaxlib {jaxlib.__version__}; {device.platform} '
          f'{device.device_kind}; constriction {metadata.version("constriction")}')


def environment_hash() -> bytes:
  return digest(environment().encode())


def seed_words(count: int, label: bytes = b'vdm_jax bits-back seed') -> np.ndarray:
  """Fixed pseudo-random words (SHA-256 in counter mode)."""
  blocks = [hashlib.sha256(label + i.to_bytes(8, 'little')).digest()
            for i in range((count + 7) // 8)]
  return np.frombuffer(b''.join(blocks), '<u4')[:count].astype(np.uint32)
