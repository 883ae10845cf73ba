"""Tests of vdm_jax.validation: every field checked before anything compiles."""

import types

import numpy as np
import pytest

import common
from vdm_jax import validation


def _config(**changes):
  """configs/test.py with changes, e.g. **{'optimizer.b2': 1.5}."""
  cfg = common.load_config('test')
  for dotted, value in changes.items():
    section, key = dotted.split('.')
    cfg[section][key] = value
  return cfg


def _errors(**changes):
  return validation.check_fields(_config(**changes))


def test_the_shipped_configs_are_valid():
  for name in ('test', 'digits', 'mnist', 'cifar10', 'cifar10_aug', 'imagenet32',
               'imagenet64', 'photo_patches'):
    assert validation.check_fields(common.load_config(name)) == [], name


@pytest.mark.parametrize('changes,expected', [
    ({'optimizer.b2': 1.5}, 'config.optimizer.b2 = 1.5: must be in [0.0, 1.0)'),
    ({'optimizer.b1': -0.1}, 'config.optimizer.b1 = -0.1: must be in [0.0, 1.0)'),
    ({'optimizer.eps': 0.0}, 'config.optimizer.eps = 0.0: must be > 0'),
    ({'optimizer.weight_decay': -1.0}, 'config.optimizer.weight_decay = -1.0: must be >= 0'),
    ({'optimizer.warmup_steps': -5}, 'config.optimizer.warmup_steps = -5: must be >= 0'),
    ({'eval.num_examples': -1}, 'config.eval.num_examples = -1: must be >= 1'),
    ({'eval.num_examples': 0}, 'config.eval.num_examples = 0: must be >= 1'),
    ({'data.num_train': 0}, 'config.data.num_train = 0: must be >= 1'),
    ({'quality.num_samples': -1}, 'config.quality.num_samples = -1: must be ≥ 0'),
    ({'quality.num_samples': 5}, 'config.quality.num_samples = 5: must exceed '
     'quality.nearest_k = 5'),
    ({'quality.confidence': 1.0}, 'config.quality.confidence = 1.0: must be in [0, 1)'),
    ({'quality.feature_steps': 0}, 'config.quality.feature_steps = 0: must be ≥ 1'),
    ({'quality.features': 'inception'}, "config.quality.features = 'inception' is not one "
     "of 'auto', 'classifier', 'autoencoder'"),
    ({'codec.step_placement': 'even'}, "config.codec.step_placement = 'even' is not one "
     "of 'uniform', 'rate'"),
    ({'training.max_skipped_fraction': 1.5},
     'config.training.max_skipped_fraction = 1.5: must be in [0, 1]'),
    ({'model.timesteps': -1}, 'config.model.timesteps = -1: must be ≥ 0'),
    ({'model.p_drop': 1.0}, 'config.model.p_drop = 1.0: must be in [0, 1)'),
    ({'model.second_order_weight': -0.1}, 'config.model.second_order_weight = -0.1: must be ≥ 0'),
    ({'training.storage_timeout': 0.001}, 'config.training.storage_timeout = 0.001: must '
     'be ≥ 1 (seconds)'),
])
def test_a_value_out_of_range_is_named_with_what_is_accepted(changes, expected):
  assert any(expected in e for e in _errors(**changes)), _errors(**changes)


def test_unknown_fields_are_named_with_their_siblings():
  cfg = _config()
  with cfg.unlocked():
    cfg.training.num_stepz = 3
  errors = validation.check_fields(cfg)
  assert len(errors) == 1 and 'config.training.num_stepz is not a known field' in errors[0]
  assert 'num_steps' in errors[0]


def test_validate_checks_the_data_and_reports_everything_at_once():
  cfg = _config(**{'eval.num_examples': 1000, 'training.batch_size': 4000,
                   'model.vocab_size': 256})
  with pytest.raises(validation.ConfigError) as e:
    validation.validate(cfg)
  message = str(e.value)
  assert "config.eval.num_examples = 1000 exceeds the 297 images of the 'test' split" in message
  assert 'config.training.batch_size = 4000 exceeds the 1500 training images' in message
  assert 'config.model.vocab_size = 256 does not match the data' in message
  assert message.startswith('Invalid config:')


def test_batch_must_divide_over_the_devices():
  mesh = types.SimpleNamespace(devices=np.empty((3,), object))
  with pytest.raises(validation.ConfigError, match=r'training.batch_size = 8 does not '
                     r'divide over the 3 devices .*use a multiple of 3 \(e.g. 9\)'):
    validation.validate(_config(), mesh=mesh)


def test_augmentation_needs_square_images(tmp_path):
  path = tmp_path / 'wide.npz'
  np.savez(path, train=np.zeros((8, 4, 6, 1), np.uint8), test=np.zeros((2, 4, 6, 1), np.uint8))
  cfg = _config(**{'data.dataset': 'npz', 'data.npz_path': str(path), 'data.augment': True,
                   'model.vocab_size': 256, 'training.batch_size': 4,
                   'eval.num_examples': None})
  with pytest.raises(validation.ConfigError, match='rotates images, which needs H == W; '
                     'npz is 4x6'):
    validation.validate(cfg)


def test_model_defining_fields_and_training_only_fields():
  saved = _config().to_dict()
  assert validation.config_difference(saved, _config(**{'model.p_drop': 0.5,
                                                        'model.weighting': 'sigmoid',
                                                        'model.second_order_weight': 0.1,
                                                        'training.num_steps': 99,
                                                        'optimizer.learning_rate': 1.0})) == []
  assert validation.config_difference(saved, _config(**{'model.n_embd': 16})) == [
      'model.n_embd: saved 8, now 16']
  with pytest.raises(validation.ConfigError, match='--allow_config_change') as e:
    validation.check_resumed_config(saved, _config(**{'model.n_embd': 16}))
  assert 'the others may change on resume' in str(e.value)  # and names a few
  assert 'training.num_steps' in str(e.value) and 'model.second_order_weight' in str(e.value)
  with pytest.raises(validation.ConfigError) as e:
    validation.check_resumed_config(saved, _config(**{'model.n_embd': 16}), hint='')
  assert '--allow_config_change' not in str(e.value)


def test_resuming_names_what_a_changed_training_field_does_and_what_may_change():
  saved = _config().to_dict()
  assert validation.training_only_changes(saved, _config()) == []
  changes = validation.training_only_changes(saved, _config(**{
      'model.time_sampling': 'adaptive', 'model.p_drop': 0.2}))
  assert changes[0] == 'model.time_sampling: saved \'antithetic\', now \'adaptive\': the ' \
      "adaptive proposal's averages per γ bin (docs/maths.md §11.5), kept in every " \
      "checkpoint, continue as saved: they are updated only while time_sampling = " \
      "'adaptive' (a run that never used it has all zeros, and its proposal starts uniform)"
  assert changes[1] == 'model.p_drop: saved 0.1, now 0.2'
  assert 'start afresh at zero' in validation.training_only_changes(
      saved, _config(**{'model.adaptive_bins': 7}))[0]
  with pytest.raises(validation.ConfigError) as e:
    validation.check_resumed_config(saved, _config(**{'model.prediction': 'v'}))
  assert ("model.prediction: saved 'eps', now 'v' (the network was trained to output the "
          'saved target)') in str(e.value)
  assert 'Fields that may change between runs: model.remat' in str(e.value)
  assert 'model.time_sampling, model.adaptive_bins' in str(e.value)


@pytest.mark.parametrize('changes,expected', [
    ({'model.prediction': 'x0'}, "config.model.prediction = 'x0' is not one of 'eps', 'v'"),
    ({'model.time_sampling': 'importance'}, "config.model.time_sampling = 'importance' is not "
     "one of 'antithetic', 'uniform', 'sigmoid', 'adaptive'"),
    ({'model.adaptive_bins': 0}, 'config.model.adaptive_bins = 0: must be an integer ≥ 1'),
    ({'model.adaptive_decay': 1.0}, 'config.model.adaptive_decay = 1.0: must be in [0, 1)'),
    ({'model.adaptive_uniform': 0.0}, 'config.model.adaptive_uniform = 0.0: must be in (0, 1]'),
])
def test_time_sampling_fields_are_checked(changes, expected):
  assert any(expected in e for e in _errors(**changes)), _errors(**changes)


@pytest.mark.parametrize('sampling', ['sigmoid', 'adaptive'])
def test_a_proposal_contradicting_the_learned_schedule_is_refused(sampling):
  """§11.7: drawn in γ, the shape between the ends has no effect on the estimator."""
  nnet = {'model.time_sampling': sampling, 'model.schedule': 'learned_nnet',
          'model.schedule_endpoints': 'pinned'}
  errors = _errors(**nnet, **{'model.schedule_variance_reduction': True})
  assert len(errors) == 1 and 'schedule_variance_reduction' in errors[0], errors
  errors = _errors(**nnet)  # continuous time: the shape would never train
  assert len(errors) == 1 and 'learned_nnet' in errors[0], errors
  assert _errors(**nnet, **{'model.timesteps': 10}) == []  # the grid still needs the shape
  assert _errors(**{'model.time_sampling': sampling}) == []  # learned_linear
  assert _errors(**{'model.time_sampling': sampling, 'model.timesteps': 10}) == []


def test_a_saved_config_without_a_newer_field_counts_as_its_default():
  saved = _config().to_dict()
  del saved['model']['prediction']
  assert validation.config_difference(saved, _config()) == []
  assert validation.config_difference(saved, _config(**{'model.prediction': 'v'})) == [
      "model.prediction: saved 'eps', now 'v'"]


def test_quality_needs_labels_for_a_classifier_and_more_test_images_than_k():
  errors = _errors(**{'data.dataset': 'npz', 'data.npz_path': 'x.npz',
                      'quality.features': 'classifier'})
  assert any("config.quality.features = 'classifier' needs labels" in e for e in errors)
  cfg = _config(**{'quality.num_samples': 400, 'quality.nearest_k': 297})
  with pytest.raises(validation.ConfigError, match='nearest_k = 297 needs more test images '
                     'than the 297 of digits'):
    validation.validate(cfg)
