"""The feature space of the sample-quality numbers: a small network trained on the data
itself (docs/maths.md §12.4), cached by the data's fingerprint.

Labelled data (datasets.load_labels) get a convolutional classifier trained on the train
split with cross-entropy; unlabelled data an autoencoder (the same convolutional trunk,
a linear decoder back to the pixels, squared error). Either way the features are the
trunk's last hidden layer (FEATURE_DIM units), and the training is a function of the
data, the seed and the number of steps alone. The trained parameters and their test
accuracy (classifier) or test squared error (autoencoder) are kept in
`quality.cache_dir` under the fingerprint of all of these, so a data set's network is
trained once per machine.
"""

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Optional

from absl import logging
from etils import epath
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax.data import datasets
from vdm_jax import errors
from vdm_jax.runtime import compiler

FEATURES = ('auto', 'classifier', 'autoencoder')
FEATURE_DIM = 128
RECIPE = 'conv16-16-pool-conv32-32-pool-dense128/adam1e-3/batch64/v1'  # in the fingerprint
BATCH_SIZE = 64
APPLY_BATCH = 500


class CacheError(errors.InputError, OSError):
  """The feature networks' cache folder cannot be written; the message says what to do."""


class FeatureNet(nn.Module):
  """Two blocks of two 3×3 convolutions and a 2×2 average pool, then a dense layer of
  FEATURE_DIM units (the features) and a linear head with `outputs` units."""
  outputs: int

  @nn.compact
  def __call__(self, x):
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    features = nn.relu(nn.Dense(FEATURE_DIM)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.outputs)(features)


def _to_inputs(images, vocab_size: int):
  """Integers in [0, V) → floats in [−1, 1], as the VDM sees them (§1)."""
  return jnp.asarray(images, jnp.float32) * (2.0 / (vocab_size - 1)) - 1.0


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A trained feature network: features(images) [N, 128] and, for a classifier,
  probabilities(images) [N, classes]; `info` says what it is and how good."""
  module: FeatureNet
  params: dict
  vocab_size: int
  info: dict

  @property
  def is_classifier(self) -> bool:
    return self.info['kind'] == 'classifier'

  @functools.cached_property
  def _jitted_apply(self):
    return jax.jit(lambda params, x: self.module.apply({'params': params},
                                                       _to_inputs(x, self.vocab_size)),
                   compiler_options=compiler.compiler_options())

  def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, FEATURE_DIM], head outputs [N, outputs]), APPLY_BATCH at a time."""
    feats, heads = [], []
    for start in range(0, len(images), APPLY_BATCH):
      f, h = self._jitted_apply(self.params, np.asarray(images[start:start + APPLY_BATCH]))
      feats.append(np.asarray(f))
      heads.append(np.asarray(h))
    return np.concatenate(feats), np.concatenate(heads)

  def features(self, images: np.ndarray) -> np.ndarray:
    return self.outputs(images)[0]

  def probabilities(self, images: np.ndarray) -> Optional[np.ndarray]:
    if not self.is_classifier:
      return None
    return np.asarray(jax.nn.softmax(self.outputs(images)[1], axis=-1))


def _loss(module, kind, vocab_size, params, images, labels):
  x = _to_inputs(images, vocab_size)
  _, out = module.apply({'params': params}, x)
  if kind == 'classifier':
    return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
  return jnp.mean((out - x.reshape(x.shape[0], -1)) ** 2)


def train(images: np.ndarray, labels: Optional[np.ndarray], vocab_size: int, steps: int,
          seed: int) -> tuple[FeatureNet, dict]:
  """Trains the classifier (labels given) or the autoencoder (labels None) for `steps`
  Adam steps of BATCH_SIZE images drawn in epochs of a seeded permutation."""
  kind = 'autoencoder' if labels is None else 'classifier'
  outputs = int(np.prod(images.shape[1:])) if labels is None else int(labels.max()) + 1
  module = FeatureNet(outputs)
  params = module.init(jax.random.key(seed), _to_inputs(images[:1], vocab_size))['params']
  tx = optax.adam(1e-3)
  labels_or_zeros = np.zeros(len(images), np.int32) if labels is None else labels

  @functools.partial(jax.jit, compiler_options=compiler.compiler_options())
  def step(params, opt_state, images, labels):  # one step per call: XLA:CPU runs loops slowly
    loss, grads = jax.value_and_grad(
        lambda p: _loss(module, kind, vocab_size, p, images, labels))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  need = steps * BATCH_SIZE
  order = np.concatenate([rng.permutation(len(images))
                          for _ in range(-(-need // len(images)))])[:need]
  opt_state = tx.init(params)
  for idx in order.reshape(steps, BATCH_SIZE):
    params, opt_state, loss = step(params, opt_state, images[idx], labels_or_zeros[idx])
  logging.info('feature network (%s): last training loss %.4f', kind, float(loss))
  return module, jax.device_get(params)


def _score(network: FeatureNetwork, images, labels) -> dict:
  """Test accuracy (classifier) or mean squared error in [−1, 1] units (autoencoder)."""
  out = network.outputs(images)[1]
  if labels is not None:
    return {'test_accuracy': float((out.argmax(axis=1) == labels).mean())}
  x = np.asarray(_to_inputs(images, network.vocab_size)).reshape(len(images), -1)
  return {'test_mse': float(np.mean((out - x) ** 2))}


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/vdm_jax, else ~/.cache/vdm_jax."""
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                      'vdm_jax')


def fingerprint(parts: dict) -> str:
  """sha256 over the recipe, the settings and the bytes of every array in `parts`."""
  h = hashlib.sha256(RECIPE.encode())
  for name in sorted(parts):
    value = parts[name]
    h.update(name.encode())
    if isinstance(value, np.ndarray):
      h.update(str((value.dtype, value.shape)).encode())
      h.update(np.ascontiguousarray(value).tobytes())
    else:
      h.update(repr(value).encode())
  return h.hexdigest()


def _checksum(params_bytes: bytes, info: dict) -> str:
  """sha256 over the parameters' bytes and the rest of info.json: a cached network whose
  bytes changed (a damaged disk, a partial copy) still parses, but fails this check."""
  rest = {k: v for k, v in info.items() if k != 'checksum'}
  return hashlib.sha256(params_bytes + json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _read_cached(folder: epath.Path, module: FeatureNet, template, vocab_size: int
                 ) -> Optional[FeatureNetwork]:
  """The cached network, or None (with a warning) when it is unreadable or its content
  is not what was written."""
  try:
    info = json.loads((folder / 'info.json').read_text())
    raw = (folder / 'params.msgpack').read_bytes()
    if not isinstance(info, dict) or info.get('checksum') != _checksum(raw, info):
      raise ValueError('its content does not match the checksum written with it')
    params = serialization.from_bytes(template, raw)
    del info['checksum']
  except Exception as e:  # pylint: disable=broad-except  # unreadable or damaged: retrain
    logging.warning('The cached feature network in %s cannot be used (%s); training it '
                    'again.', folder, e)
    return None
  return FeatureNetwork(module, params, vocab_size, info)


def _write_cached(folder: epath.Path, network: FeatureNetwork) -> None:
  """Writes into a temporary folder beside `folder`, then renames it into place."""
  tmp = folder.parent / f'.{folder.name}.{os.getpid()}.tmp'
  tmp.mkdir(parents=True, exist_ok=True)
  raw = serialization.to_bytes(network.params)
  info = dict(network.info, checksum=_checksum(raw, network.info))
  (tmp / 'params.msgpack').write_bytes(raw)
  (tmp / 'info.json').write_text(json.dumps(info, indent=2, sort_keys=True))
  if folder.exists():  # another process was faster, or an unreadable copy: replace it
    for child in folder.iterdir():
      child.unlink()
    folder.rmdir()
  tmp.rename(folder)


def _cache_root(cache_dir: Optional[str]) -> epath.Path:
  return epath.Path(cache_dir or default_cache_dir()) / 'feature_networks'


def check_cache_dir(cache_dir: Optional[str]) -> epath.Path:
  """The cache root, created and writable, or a CacheError naming quality.cache_dir."""
  root = _cache_root(cache_dir)
  probe = root / f'.probe.{os.getpid()}'
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise CacheError(f'config.quality.cache_dir: cannot write the feature networks\' cache '
                     f'{root} ({e.strerror or e}); point quality.cache_dir at a writable '
                     'folder.') from e
  return root


def kind_for(data_config, features: str = 'auto') -> str:
  """'classifier' where the data have labels, else 'autoencoder' (features='auto')."""
  if features != 'auto':
    return features
  return 'classifier' if datasets.get(data_config.dataset).labelled else 'autoencoder'


def load_or_train(config) -> FeatureNetwork:
  """The feature network of config.data (quality.features, feature_steps, feature_seed):
  from the cache when its fingerprint is there (reading is all that needs: the cache
  may be read-only), else trained and cached (the cache must be writable)."""
  q = config.quality
  root = _cache_root(q.cache_dir)
  kind = kind_for(config.data, q.features)
  vocab_size = config.model.vocab_size
  data = {split: datasets.load_split(config.data, split) for split in datasets.SPLITS}
  labels = {split: (datasets.load_labels(config.data, split) if kind == 'classifier'
                    else None) for split in datasets.SPLITS}
  digest = fingerprint(dict(kind=kind, steps=q.feature_steps, seed=q.feature_seed,
                            vocab_size=vocab_size, train=data['train'],
                            test=data['test'], train_labels=labels['train'],
                            test_labels=labels['test']))
  folder = root / f'{config.data.dataset}-{kind}-{digest[:16]}'
  outputs = (int(labels['train'].max()) + 1 if kind == 'classifier'
             else int(np.prod(data['train'].shape[1:])))
  module = FeatureNet(outputs)
  if folder.is_dir():
    template = jax.eval_shape(
        module.init, jax.random.key(0), _to_inputs(data['train'][:1], vocab_size))['params']
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
    network = _read_cached(folder, module, template, vocab_size)
    if network is not None:
      return network
  check_cache_dir(q.cache_dir)  # before the training, whose result it keeps
  start = time.time()
  logging.info('Training the %s feature network of %s (%d steps); it is cached in %s.',
               kind, config.data.dataset, q.feature_steps, folder)
  module, params = train(data['train'], labels['train'], vocab_size, q.feature_steps,
                         q.feature_seed)
  info = dict(kind=kind, dataset=config.data.dataset, fingerprint=digest,
              steps=q.feature_steps, seed=q.feature_seed, recipe=RECIPE,
              feature_dim=FEATURE_DIM, train_seconds=round(time.time() - start, 1))
  network = FeatureNetwork(module, params, vocab_size, info)
  info.update(_score(network, data['test'], labels['test']))
  if jax.process_index() == 0:
    try:
      _write_cached(folder, network)
    except OSError as e:
      logging.warning('Could not cache the feature network in %s (%s); it will be trained '
                      'again next time.', folder, e)
  return network
