"""Config validation: every field checked once, at the edge, before anything compiles.

Every message names the field, the value given and what is accepted; all problems are
reported at once. Inside the package the locked, validated config is trusted.
"""

import math
import re

from flax import traverse_util
import jax

from vdm_jax import config_base
from vdm_jax.data import datasets
from vdm_jax import errors
from vdm_jax.evaluation import feature_net
from vdm_jax.evaluation import ode
from vdm_jax.model import networks
from vdm_jax.model import schedules
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.training import optim
from vdm_jax.training import phema

DTYPES = ('float32', 'bfloat16')
DECODES = ('argmax', 'draw')
# Fields that change what the model computes or its parameters: a resumed workdir must
# not silently continue with other values. How the model is computed or trained (remat,
# attention_impl, dtype, the training objective's weighting, the §4 gradient, dropout)
# may change between runs, and evaluation ignores it.
_NOT_MODEL_DEFINING = ('remat', 'attention_impl', 'dtype', 'weighting', 'sigmoid_bias',
                       'sigmoid_scale', 'schedule_variance_reduction', 'time_sampling',
                       'adaptive_bins', 'adaptive_decay', 'adaptive_uniform', 'p_drop')
MODEL_DEFINING = tuple(f'model.{k}' for k in config_base.get_config().model
                       if k not in _NOT_MODEL_DEFINING) + ('data.dataset', 'data.augment')


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


def _choice(errors, name, value, accepted):
  if value not in accepted:
    errors.append(f'config.{name} = {value!r} is not one of {", ".join(map(repr, accepted))}.')


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
  _choice(errors, 'data.dataset', d.dataset, datasets.DATASETS)
  _choice(errors, 'model.schedule', m.schedule, schedules.SCHEDULES)
  _choice(errors, 'model.schedule_endpoints', m.schedule_endpoints, schedules.ENDPOINTS)
  _choice(errors, 'model.weighting', m.weighting, vdm.WEIGHTINGS)
  _choice(errors, 'model.prediction', m.prediction, vdm.PREDICTIONS)
  _choice(errors, 'model.time_sampling', m.time_sampling, time_sampling.TIME_SAMPLINGS)
  _choice(errors, 'model.dtype', m.dtype, DTYPES)
  _choice(errors, 'model.attention_impl', m.attention_impl, networks.ATTENTION_IMPLS)
  _choice(errors, 'optimizer.decay', o.decay, optim.DECAYS)
  _choice(errors, 'optimizer.weight_decay_mask', o.weight_decay_mask, optim.WEIGHT_DECAY_MASKS)
  _choice(errors, 'sample.decode', config.sample.decode, DECODES)
  _choice(errors, 'eval.split', config.eval.split, datasets.EVAL_SPLITS)
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
  if not 0.0 <= m.p_drop < 1.0:
    errors.append(f'config.model.p_drop = {m.p_drop}: must be in [0, 1).')
  if m.schedule_variance_reduction and not (
      m.schedule == 'learned_nnet' and m.schedule_endpoints == 'pinned'):
    errors.append('config.model.schedule_variance_reduction = True needs '
                  "model.schedule = 'learned_nnet' and model.schedule_endpoints = 'pinned' "
                  f'(got {m.schedule!r}, {m.schedule_endpoints!r}): only a pinned shape '
                  'can follow the variance (docs/maths.md §4).')
  errors += _check_time_sampling(m)
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
  if not t.storage_timeout > 0:
    errors.append(f'config.training.storage_timeout = {t.storage_timeout}: must be > 0 '
                  '(seconds).')
  errors += _check_ode_fields(config) + _check_codec_fields(config.codec)
  errors += _check_quality_fields(config) + phema.check_config(config)
  if d.dataset == 'npz' and not d.npz_path:
    errors.append("config.data.npz_path is required with data.dataset = 'npz' "
                  '(a .npz with uint8 arrays train and test, [N, H, W, C]).')
  return errors


def _check_time_sampling(m) -> list[str]:
  """The proposal's fields, and the combinations a γ-drawn estimator contradicts (§11.7)."""
  errors = []
  if not (isinstance(m.adaptive_bins, int) and m.adaptive_bins >= 1):
    errors.append(f'config.model.adaptive_bins = {m.adaptive_bins!r}: must be an integer ≥ 1.')
  if not 0.0 <= m.adaptive_decay < 1.0:
    errors.append(f'config.model.adaptive_decay = {m.adaptive_decay}: must be in [0, 1).')
  if not 0.0 < m.adaptive_uniform <= 1.0:
    errors.append(f'config.model.adaptive_uniform = {m.adaptive_uniform}: must be in (0, 1] '
                  '(the uniform share keeps the proposal density above zero).')
  if m.time_sampling not in time_sampling.IN_GAMMA:
    return errors
  if m.schedule_variance_reduction:
    errors.append(f'config.model.time_sampling = {m.time_sampling!r} draws the noise level '
                  'γ itself, so the schedule\'s shape no longer changes the estimator\'s '
                  'variance that model.schedule_variance_reduction = True trains it for '
                  '(docs/maths.md §11.7); use time_sampling = \'antithetic\' with it, or '
                  'turn it off.')
  elif m.schedule == 'learned_nnet' and m.timesteps == 0:
    errors.append(f'config.model.time_sampling = {m.time_sampling!r} in continuous time '
                  '(model.timesteps = 0) draws γ itself: the learned_nnet schedule\'s '
                  'shape between its ends would get no gradient and never train '
                  '(docs/maths.md §11.7). Use model.schedule = \'learned_linear\' (its ends '
                  'are all that matter there), a discrete-time model, or time_sampling = '
                  '\'antithetic\'.')
  return errors


def _check_ode_fields(config) -> list[str]:
  """eval.estimator and the probability-flow ODE's section (vdm_jax/evaluation/ode.py)."""
  errors, o = [], config.ode
  _choice(errors, 'eval.estimator', config.eval.estimator, ('bound', 'ode'))
  _choice(errors, 'ode.solver', o.solver, ode.SOLVERS)
  _choice(errors, 'ode.trace', o.trace, ode.TRACES)
  _choice(errors, 'ode.probe', o.probe, ode.PROBES)
  _choice(errors, 'ode.dequantisation', o.dequantisation, ode.DEQUANTISATIONS)
  for name in ('rtol', 'atol'):
    if not o[name] > 0:
      errors.append(f'config.ode.{name} = {o[name]}: must be > 0 (e.g. 1e-5).')
  if not 0.0 <= o.t_eps < 1.0:
    errors.append(f'config.ode.t_eps = {o.t_eps}: must be in [0, 1) (e.g. 1e-5).')
  for name in ('max_steps', 'num_probes', 'trace_chunk'):
    if o[name] < 1:
      errors.append(f'config.ode.{name} = {o[name]}: must be ≥ 1.')
  if o.num_steps is not None and not 1 <= o.num_steps <= o.max_steps:
    errors.append(f'config.ode.num_steps = {o.num_steps}: must be None (adaptive) or in '
                  f'1..ode.max_steps = {o.max_steps}.')
  if o.num_steps is None and o.solver == 'euler':
    errors.append("config.ode.solver = 'euler' has no error estimate: set ode.num_steps "
                  "or choose dopri5, tsit5 or heun.")
  return errors


def _check_codec_fields(c) -> list[str]:
  """config.codec (vdm_jax/codec/compressor.py): positive, within 32 bits for T and
  first_images and 16 bits for the others, bounds no useful setting reaches."""
  errors = []
  for name, low, high in (('timesteps', 1, 2**32 - 1), ('batch_size', 1, 2**16 - 1),
                          ('first_group', 1, None), ('resolution', 1, 2**16 - 1),
                          ('first_resolution', 1, 2**16 - 1),
                          ('first_images', 0, 2**32 - 1), ('support', 1, 2**16 - 1)):
    if c[name] < low or (high is not None and c[name] > high):
      errors.append(f'config.codec.{name} = {c[name]}: must be '
                    + (f'≥ {low}.' if high is None else f'in {low}..{high}.'))
  return errors


def _check_quality_fields(config) -> list[str]:
  """config.quality: the sample-quality numbers of --mode=sample (docs/maths.md §12)."""
  errors, q = [], config.quality
  _choice(errors, 'quality.features', q.features, feature_net.FEATURES)
  if q.num_samples < 0:
    errors.append(f'config.quality.num_samples = {q.num_samples}: must be ≥ 0 (0 = no '
                  'sample-quality numbers).')
  elif 0 < q.num_samples <= q.nearest_k:
    errors.append(f'config.quality.num_samples = {q.num_samples}: must exceed '
                  f'quality.nearest_k = {q.nearest_k} (each sample\'s ball reaches its '
                  'k-th nearest neighbour), or be 0; a few hundred give stable numbers.')
  for name in ('batch_size', 'nearest_k', 'feature_steps'):
    if q[name] < 1:
      errors.append(f'config.quality.{name} = {q[name]}: must be ≥ 1.')
  if not 0.0 <= q.confidence < 1.0:
    errors.append(f'config.quality.confidence = {q.confidence}: must be in [0, 1).')
  if q.features == 'classifier' and config.data.dataset in datasets.DATASETS and not (
      datasets.get(config.data.dataset).labelled):
    errors.append(f"config.quality.features = 'classifier' needs labels, which "
                  f'data.dataset = {config.data.dataset!r} does not provide here; use '
                  "'autoencoder' or 'auto'.")
  return errors


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
    raise ConfigError(
        ['this workdir holds a model defined differently from the current config:']
        + diffs + [f'Use the saved config (config.json in the workdir), another --workdir{hint}.'])
  return diffs
