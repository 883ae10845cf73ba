"""Tests of vdm_jax.evaluation.feature_net: the feature networks, their training and
their cache (docs/maths.md §12.4)."""

import numpy as np
import pytest
from flax import serialization

import common
from vdm_jax.data import datasets
from vdm_jax.evaluation import feature_net


def _config(cache_dir, steps=300, **data):
  cfg = common.load_config('test')
  cfg.quality.cache_dir = str(cache_dir)
  cfg.quality.feature_steps = steps
  for key, value in data.items():
    cfg.data[key] = value
  return cfg


def test_the_classifier_learns_the_digits(digits_features):
  cfg, network = digits_features
  assert network.info['kind'] == 'classifier' and network.info['steps'] == 300
  assert network.info["test_accuracy"] > 0.8  # chance: 0.1
  test = datasets.load_split(cfg.data, 'test')
  assert network.features(test).shape == (297, feature_net.FEATURE_DIM)
  probs = network.probabilities(test)
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  labels = datasets.load_labels(cfg.data, 'test')
  assert (probs.argmax(1) == labels).mean() == network.info['test_accuracy']


def test_the_cached_network_is_reused_bit_for_bit(digits_features, monkeypatch):
  cfg, network = digits_features
  monkeypatch.setattr(feature_net, 'train', lambda *a: pytest.fail('trained again'))
  again = feature_net.load_or_train(cfg)
  assert serialization.to_bytes(again.params) == serialization.to_bytes(network.params)
  assert again.info == network.info


def test_training_is_reproducible_bit_for_bit_and_depends_on_the_seed():
  cfg = common.load_config('test')
  images = datasets.load_split(cfg.data, 'train')
  labels = datasets.load_labels(cfg.data, 'train')
  runs = [feature_net.train(images, labels, 17, 20, seed)[1] for seed in (0, 0, 1)]
  assert serialization.to_bytes(runs[0]) == serialization.to_bytes(runs[1])
  assert serialization.to_bytes(runs[0]) != serialization.to_bytes(runs[2])


def test_an_unreadable_cached_network_is_trained_again(tmp_path, monkeypatch):
  cfg = _config(tmp_path, steps=10)
  first = feature_net.load_or_train(cfg)
  (folder,) = (tmp_path / 'feature_networks').iterdir()
  (folder / 'params.msgpack').write_bytes(b'garbage')
  calls = []
  train = feature_net.train
  monkeypatch.setattr(feature_net, 'train', lambda *a: calls.append(1) or train(*a))
  again = feature_net.load_or_train(cfg)
  assert calls == [1]
  assert serialization.to_bytes(again.params) == serialization.to_bytes(first.params)
  cached = feature_net.load_or_train(cfg)  # written again, read back
  assert calls == [1] and cached.info['fingerprint'] == first.info['fingerprint']


def test_a_damaged_cached_network_that_still_parses_is_trained_again(tmp_path, monkeypatch):
  """Bits flipped in the parameters' floats, or the cached accuracy edited: both files
  still parse, and only the checksum written with them tells."""
  cfg = _config(tmp_path, steps=10)
  first = feature_net.load_or_train(cfg)
  (folder,) = (tmp_path / 'feature_networks').iterdir()
  good = {name: (folder / name).read_bytes() for name in ('params.msgpack', 'info.json')}
  flipped = bytearray(good['params.msgpack'])
  for i in (-5, -9, -13):  # low bits of the last float32s of the last kernel
    flipped[i] ^= 0x01
  edited = good['info.json'].replace(b'"test_accuracy": 0.', b'"test_accuracy": 1.')
  assert edited != good['info.json']
  calls = []
  train = feature_net.train
  monkeypatch.setattr(feature_net, 'train', lambda *a: calls.append(1) or train(*a))
  for name, damaged in (('params.msgpack', bytes(flipped)), ('info.json', edited)):
    (folder / name).write_bytes(damaged)
    if name == 'params.msgpack':  # still readable: only its content changed
      serialization.msgpack_restore(damaged)
    again = feature_net.load_or_train(cfg)
    assert serialization.to_bytes(again.params) == serialization.to_bytes(first.params)
    timeless = lambda info: {k: v for k, v in info.items() if k != 'train_seconds'}
    assert timeless(again.info) == timeless(first.info)
    assert (folder / 'params.msgpack').read_bytes() == good['params.msgpack']  # rewritten
  assert len(calls) == 2
  assert timeless(feature_net.load_or_train(cfg).info) == timeless(first.info)
  assert len(calls) == 2  # the rewritten cache passes the check


def test_a_read_only_cache_that_holds_the_network_is_used(tmp_path, monkeypatch):
  cfg = _config(tmp_path, steps=10)
  first = feature_net.load_or_train(cfg)
  monkeypatch.setattr(feature_net, 'train', lambda *a: pytest.fail('trained again'))
  with common.read_only(tmp_path):
    again = feature_net.load_or_train(cfg)
  assert serialization.to_bytes(again.params) == serialization.to_bytes(first.params)


def test_a_cache_folder_that_cannot_be_written_names_the_field(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(feature_net.CacheError, match='config.quality.cache_dir'):
    feature_net.load_or_train(_config(blocker / 'cache', steps=10))


def test_unlabelled_data_get_an_autoencoder_better_than_the_mean(tmp_path):
  digits = datasets.load_split(common.data_config(dataset='digits'), 'train')
  path = tmp_path / 'digits.npz'
  np.savez(path, train=digits[:1200], test=digits[1200:])
  cfg = _config(tmp_path / 'cache', steps=200, dataset='npz', npz_path=str(path))
  network = feature_net.load_or_train(cfg)
  assert network.info['kind'] == 'autoencoder' and network.probabilities(digits) is None
  x = digits[1200:].reshape(300, -1) * (2 / 16) - 1  # as the network sees them
  mean_predictor_mse = np.mean((x - x.mean(0)) ** 2)
  assert network.info['test_mse'] < 0.5 * mean_predictor_mse


def test_the_fingerprint_follows_every_byte_and_setting():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  base = feature_net.fingerprint(dict(train=images, steps=10))
  changed = images.copy()
  changed[3, 1, 1, 0] = 1
  assert feature_net.fingerprint(dict(train=changed, steps=10)) != base
  assert feature_net.fingerprint(dict(train=images, steps=11)) != base
  assert feature_net.fingerprint(dict(train=images, steps=10)) == base
