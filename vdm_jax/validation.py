"""Config validation: every field checked once, at the edge, before anything compiles.

Every message names the field, the value given and what is accepted; all problems are
reported at once. Inside the package the locked, validated config is trusted.
"""

import math
import re

from flax import traverse_util
import jax

from vdm_jax import config_base
from vdm_jax import config_checks
from vdm_jax.data import datasets
from vdm_jax import errors
from vdm_jax.model import multivariate
from vdm_jax.model import networks
from vdm_jax.model import schedules
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.training import optim
from vdm_jax.training import phema

DTYPES = ('float32', 'bfloat16')
# training.storage_timeout's least value: orbax bounds a save in whole seconds, and the
# lock's heartbeat (every third of the timeout) must get a refresh through within it.
MIN_STORAGE_TIMEOUT = 1.0
DECODES = ('argmax', 'draw')
# Fields that change what the model computes or its parameters: a resumed workdir must
# not silently continue with other values. How the model is computed or trained (remat,
# attention_impl, dtype, the training objective's weighting and second-order term, the §4
# gradient, dropout) may change between runs, and evaluation ignores it; so may every
# field outside config.model (training.num_steps: continue a finished run for longer).
_NOT_MODEL_DEFINING = ('remat', 'attention_impl', 'dtype', 'weighting', 'sigmoid_bias',
                       'sigmoid_scale', 'second_order_weight', 'schedule_variance_reduction',
                       'time_sampling', 'adaptive_bins', 'adaptive_decay',
                       'adaptive_uniform', 'p_drop')
MODEL_DEFINING = tuple(f'model.{k}' for k in config_base.get_config().model
                       if k not in _NOT_MODEL_DEFINING) + ('data.dataset', 'data.augment')
TRAINING_ONLY = tuple(f'model.{k}' for k in _NOT_MODEL_DEFINING)
_ADAPTIVE = ("the adaptive proposal's averages per γ bin (docs/maths.md §11.5), kept in "
             'every checkpoint')
# What a change of a training-only field on resuming does, where it is not plain.
_RESUME_NOTES = {
    'model.time_sampling': f'{_ADAPTIVE}, continue as saved: they are updated only while '
                           "time_sampling = 'adaptive' (a run that never used it has all zeros, "
                           'and its proposal starts uniform)',
    'model.adaptive_bins': f'{_ADAPTIVE}, start afresh at zero with the new bins',
    'model.adaptive_decay': f'{_ADAPTIVE}, continue as saved at the new decay',
    'model.weighting': f'{_ADAPTIVE} hold the old weighting\'s integrand until they decay',
}
# A model-defining field whose change needs more than its name.
_REFUSAL_NOTES = {
    'model.prediction': 'the network was trained to output the saved target',
}


class ConfigError(errors.InputError, ValueError):
  """One or more config fields are invalid; the message lists each with the fix."""

  def __init__(self, errors):
    errors = [errors] if isinstance(errors, str) else list(errors)
    super().__init__('Invalid config:\n  ' + '\n  '.join(errors))
    self.errors = errors


def flatten(config) -> dict:
  """{'a.b': value} of a ConfigDict or dict; tuples and lists are leaves."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  return traverse_util.flatten_dict(tree, sep='.')


def check_fields(config) -> list[str]:
  """Unknown keys and bad values, without touching data or devices: every float field
  finite first (a NaN passes every comparison), then each field's range."""
  nonfinite = {key: f'config.{key} = {value}: must be a finite number.'
               for key, value in flatten(config).items()
               if isinstance(value, float) and not math.isfinite(value)}
  names = lambda message: set(re.findall(r'config\.([\w.]*\w)', message))
  return list(nonfinite.values()) + [e for e in _check_values(config)
                                     if not names(e) & set(nonfinite)]


def _check_values(config) -> list[str]:
  errors = []
  known = flatten(config_base.get_config())
  given = flatten(config)
  for key in sorted(set(given) - set(known)):
    errors.append(f'config.{key} is not a known field (typo?). Known fields of '
                  f'config.{key.rsplit(".", 1)[0] if "." in key else ""}: '
                  + ', '.join(sorted(k.rsplit('.', 1)[-1] for k in known
                                     if k.rsplit('.', 1)[0] == key.rsplit('.', 1)[0])))
  m, t, o, d = config.model, config.training, config.optimizer, config.data
  choice = config_checks.choice
  choice(errors, 'data.dataset', d.dataset, datasets.DATASETS)
  choice(errors, 'model.schedule', m.schedule, schedules.SCHEDULES + (multivariate.NAME,))
  choice(errors, 'model.schedule_endpoints', m.schedule_endpoints, schedules.ENDPOINTS)
  choice(errors, 'model.weighting', m.weighting, vdm.WEIGHTINGS)
  choice(errors, 'model.prediction', m.prediction, vdm.PREDICTIONS)
  choice(errors, 'model.time_sampling', m.time_sampling, time_sampling.TIME_SAMPLINGS)
  choice(errors, 'model.dtype', m.dtype, DTYPES)
  choice(errors, 'model.attention_impl', m.attention_impl, networks.ATTENTION_IMPLS)
  choice(errors, 'optimizer.decay', o.decay, optim.DECAYS)
  choice(errors, 'optimizer.weight_decay_mask', o.weight_decay_mask, optim.WEIGHT_DECAY_MASKS)
  choice(errors, 'sample.decode', config.sample.decode, DECODES)
  choice(errors, 'eval.split', config.eval.split, datasets.EVAL_SPLITS)
  if m.timesteps < 0:
    errors.append(f'config.model.timesteps = {m.timesteps}: must be ≥ 0 (0 = continuous '
                  'time, T > 0 = the discrete-time bound with T steps).')
  if not m.gamma_min < m.gamma_max:
    errors.append(f'config.model.gamma_min = {m.gamma_min} must be < config.model.gamma_max '
                  f'= {m.gamma_max} (γ is increasing; the paper uses -13.3 and 5.0).')
  if m.vocab_size < 2:
    errors.append(f'config.model.vocab_size = {m.vocab_size}: must be ≥ 2.')
  if m.n_embd < 4 or m.n_embd % 2:
    errors.append(f'config.model.n_embd = {m.n_embd}: must be an even number ≥ 4 (the '
                  'time embedding uses n_embd/2 frequencies).')
  elif m.groupnorm_groups < 1 or m.n_embd % m.groupnorm_groups:
    errors.append(f'config.model.n_embd = {m.n_embd} does not divide by '
                  f'config.model.groupnorm_groups = {m.groupnorm_groups}; choose groups '
                  f'among {[g for g in range(1, m.n_embd + 1) if m.n_embd % g == 0]}.')
  if m.n_layer < 0:
    errors.append(f'config.model.n_layer = {m.n_layer}: must be ≥ 0.')
  mults = m.channel_mult
  if (not isinstance(mults, (tuple, list)) or not mults
      or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in mults)):
    errors.append(f'config.model.channel_mult = {mults!r}: must be a non-empty tuple of '
                  'integers ≥ 1, e.g. (1,) (the paper) or (1, 2, 2); on the command line '
                  "--config.model.channel_mult='(1, 2, 2)'.")
  if m.with_fourier_features and m.fourier_n_min > m.fourier_n_max:
    errors.append(f'config.model.fourier_n_min = {m.fourier_n_min} > fourier_n_max = '
                  f'{m.fourier_n_max}: the Fourier range is empty or inverted (n_min ≤ '
                  'n_max, inclusive; or set with_fourier_features=False).')
  if not m.sigmoid_scale >= 0.0:
    errors.append(f'config.model.sigmoid_scale = {m.sigmoid_scale}: must be >= 0 '
                  '(w = 1 + a*sigmoid(b - lambda) must stay positive).')
  if not m.second_order_weight >= 0.0:
    errors.append(f'config.model.second_order_weight = {m.second_order_weight}: must be ≥ 0 '
                  '(0 = off; i-DODE fine-tunes with 0.1).')
  if not 0.0 <= m.p_drop < 1.0:
    errors.append(f'config.model.p_drop = {m.p_drop}: must be in [0, 1).')
  if m.schedule_variance_reduction and not (
      m.schedule == 'learned_nnet' and m.schedule_endpoints == 'pinned'):
    errors.append('config.model.schedule_variance_reduction = True needs '
                  "model.schedule = 'learned_nnet' and model.schedule_endpoints = 'pinned' "
                  f'(got {m.schedule!r}, {m.schedule_endpoints!r}): only a pinned shape '
                  'can follow the variance (docs/maths.md §4).')
  errors += config_checks.check_time_sampling(m) + config_checks.check_multivariate(config)
  for name, value in (('training.batch_size', t.batch_size),
                      ('training.num_steps', t.num_steps),
                      ('training.steps_per_call', t.steps_per_call),
                      ('training.log_every', t.log_every),
                      ('training.checkpoint_every', t.checkpoint_every),
                      ('training.keep_checkpoints', t.keep_checkpoints),
                      ('eval.batch_size', config.eval.batch_size),
                      ('eval.num_draws', config.eval.num_draws),
                      ('sample.num_samples', config.sample.num_samples),
                      ('sample.timesteps', config.sample.timesteps)):
    if value < 1:
      errors.append(f'config.{name} = {value}: must be ≥ 1.')
  for name, value in (('training.scan_unroll', t.scan_unroll),
                      ('training.eval_every', t.eval_every),
                      ('training.sample_every', t.sample_every)):
    if value < 0:
      errors.append(f'config.{name} = {value}: must be ≥ 0 (0 = never).')
  for T in config.eval.discrete_timesteps:
    if int(T) < 1:
      errors.append(f'config.eval.discrete_timesteps contains {T}: each T must be ≥ 1.')
  if o.learning_rate <= 0:
    errors.append(f'config.optimizer.learning_rate = {o.learning_rate}: must be > 0.')
  if not 0.0 <= o.ema_rate < 1.0:
    errors.append(f'config.optimizer.ema_rate = {o.ema_rate}: must be in [0, 1).')
  if o.grad_clip is not None and o.grad_clip <= 0:
    errors.append(f'config.optimizer.grad_clip = {o.grad_clip}: must be > 0 or None.')
  for name, value, low, high in (('optimizer.b1', o.b1, 0.0, 1.0),
                                 ('optimizer.b2', o.b2, 0.0, 1.0)):
    if not low <= value < high:
      errors.append(f'config.{name} = {value}: must be in [{low}, {high}) (Adam\'s decay '
                    'rate of a moment estimate; the paper uses b1 = 0.9, b2 = 0.99).')
  if not o.schedule_lr_scale >= 0:
    errors.append(f'config.optimizer.schedule_lr_scale = {o.schedule_lr_scale}: must be '
                  '>= 0 (0 freezes the schedule, 1.0 = the learning rate itself).')
  if not o.eps > 0:
    errors.append(f'config.optimizer.eps = {o.eps}: must be > 0.')
  if o.weight_decay < 0:
    errors.append(f'config.optimizer.weight_decay = {o.weight_decay}: must be >= 0.')
  if o.warmup_steps < 0:
    errors.append(f'config.optimizer.warmup_steps = {o.warmup_steps}: must be >= 0 '
                  '(0 = no warm-up).')
  for name, value in (('data.num_train', d.num_train), ('eval.num_examples', config.eval.num_examples)):
    if value is not None and value < 1:
      errors.append(f'config.{name} = {value}: must be >= 1, or None for all images.')
  if not 0.0 <= t.max_skipped_fraction <= 1.0:
    errors.append(f'config.training.max_skipped_fraction = {t.max_skipped_fraction}: must be '
                  'in [0, 1].')
  if not t.storage_timeout >= MIN_STORAGE_TIMEOUT:
    errors.append(f'config.training.storage_timeout = {t.storage_timeout}: must be ≥ '
                  f'{MIN_STORAGE_TIMEOUT:g} (seconds): the lock\'s heartbeat is refreshed '
                  'every third of it, and a refresh or a save waits whole seconds; the '
                  'default is 600.')
  errors += (config_checks.check_ode_fields(config)
             + config_checks.check_codec_fields(config.codec))
  errors += config_checks.check_quality_fields(config) + phema.check_config(config)
  if d.dataset == 'npz' and not d.npz_path:
    errors.append("config.data.npz_path is required with data.dataset = 'npz' "
                  '(a .npz with uint8 arrays train and test, [N, H, W, C]).')
  return errors


def refuse_unsupported_mode(config, mode: str) -> None:
  """Commands that do not support the configured model, refused before anything runs."""
  if config.model.schedule == multivariate.NAME and mode in ('compress', 'decompress'):
    raise ConfigError([f"--mode={mode} does not support model.schedule = 'mulan' (the "
                       'codec codes one noise level per image; its latent would need '
                       'bits-back coding too): use a model with a scalar schedule.'])


def validate(config, mesh=None, image_shape=None) -> datasets.DatasetInfo:
  """Checks the config, the devices and the data; returns the data's DatasetInfo.

  With `image_shape` (H, W, C) the data is not read (a model without its dataset,
  e.g. an imported checkpoint evaluated elsewhere).
  """
  errors = check_fields(config)
  if errors:
    raise ConfigError(errors)
  if mesh is not None:
    n = mesh.devices.size
    for name, value in (('training.batch_size', config.training.batch_size),
                        ('eval.batch_size', config.eval.batch_size)):
      if value % n:
        errors.append(f'config.{name} = {value} does not divide over the {n} devices '
                      f'({jax.process_count()} process(es)); use a '
                      f'multiple of {n} (e.g. {(value // n + 1) * n}).')
  if image_shape is not None:
    info = datasets.DatasetInfo(config.data.dataset, *image_shape,
                                vocab_size=config.model.vocab_size, num_train=0, num_test=0)
  else:
    try:
      info = datasets.dataset_info(config.data)
    except ValueError as e:  # bad user data
      raise ConfigError([f'data (config.data.dataset = {config.data.dataset!r}): {e}']) from e
    if info.num_train < config.training.batch_size:
      errors.append(f'config.training.batch_size = {config.training.batch_size} exceeds the '
                    f'{info.num_train} training images of {info.name} (after '
                    'data.num_train); lower the batch size or use more training images.')
    split_size = {'test': info.num_test, 'train': info.num_train,
                  'validation': info.num_validation}[config.eval.split]
    if config.eval.num_examples is not None and config.eval.num_examples > split_size:
      errors.append(f'config.eval.num_examples = {config.eval.num_examples} exceeds the '
                    f'{split_size} images of the {config.eval.split!r} split of {info.name}; '
                    f'choose 1..{split_size}, or None for all.')
    if config.quality.num_samples and config.quality.nearest_k >= info.num_test:
      errors.append(f'config.quality.nearest_k = {config.quality.nearest_k} needs more '
                    f'test images than the {info.num_test} of {info.name}: lower it.')
    if info.vocab_size != config.model.vocab_size:
      errors.append(f'config.model.vocab_size = {config.model.vocab_size} does not match '
                    f'the data: {info.name} has V = {info.vocab_size} values per sub-pixel; '
                    f'set --config.model.vocab_size={info.vocab_size}.')
  levels = len(config.model.channel_mult) - 1
  if info.height % 2**levels or info.width % 2**levels:
    errors.append(f'config.model.channel_mult = {tuple(config.model.channel_mult)} halves '
                  f'the image {levels} time(s), so H and W must divide by {2**levels}; '
                  f'{info.name} is {info.height}x{info.width}. Use fewer entries.')
  if config.data.augment and info.height != info.width:
    errors.append(f'config.data.augment = True rotates images, which needs H == W; '
                  f'{info.name} is {info.height}x{info.width}.')
  if errors:
    raise ConfigError(errors)
  return info


def config_difference(saved: dict, config, fields=MODEL_DEFINING) -> list[str]:
  """The model-defining fields whose value differs from the saved config.json.

  A field the saved config lacks (it predates the field) counts as its default.
  """
  flat_saved, flat_now = flatten(saved), flatten(config)
  defaults = flatten(config_base.get_config())
  as_tuple = lambda v: tuple(v) if isinstance(v, list) else v
  diffs = []
  for key in fields:
    old = as_tuple(flat_saved.get(key, defaults.get(key, '<absent>')))
    new = as_tuple(flat_now.get(key, '<absent>'))
    if old != new:
      diffs.append(f'{key}: saved {old!r}, now {new!r}')
  return diffs


def check_resumed_config(saved: dict, config, allow: bool = False,
                         hint: str = ', or --allow_config_change to continue deliberately'
                         ) -> list[str]:
  """Refuses a workdir whose saved config defines another model; returns the differences."""
  diffs = config_difference(saved, config)
  if diffs and not allow:
    noted = [d + (f' ({_REFUSAL_NOTES[d.split(":")[0]]})' if d.split(':')[0] in
                  _REFUSAL_NOTES else '') for d in diffs]
    raise ConfigError(
        ['this workdir holds a model defined differently from the current config:']
        + noted + [f'Use the saved config (config.json in the workdir), another '
                   f'--workdir{hint}.',
                   'Only the fields above must match; the others may change on resume. '
                   f'(Fields that may change between runs: {", ".join(TRAINING_ONLY)}, and '
                   'the fields outside config.model but data.dataset and data.augment: '
                   'e.g. training.num_steps continues a finished run, optimizer.* changes '
                   'its optimisation, model.second_order_weight makes it a second-order '
                   'fine-tune, docs/maths.md §15.3.)'])
  return diffs


def training_only_changes(saved: dict, config) -> list[str]:
  """The training-only model fields that differ from the saved config, each with what
  the change does to a resumed run where that is not plain (logged on resuming)."""
  return [d + (f': {_RESUME_NOTES[d.split(":")[0]]}' if d.split(':')[0] in _RESUME_NOTES
               else '') for d in config_difference(saved, config, TRAINING_ONLY)]
