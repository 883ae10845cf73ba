"""Config validation at start-up, before anything is compiled.

Every message names the field, the value given and what is accepted. All problems
are reported at once.
"""

from typing import Optional

import ml_collections

from vdm_jax import config_base
from vdm_jax import input_pipeline
from vdm_jax import networks
from vdm_jax import ode
from vdm_jax import optim
from vdm_jax import schedules
from vdm_jax import vdm

CONV_IMPLS = ('auto', 'xla', 'patches')
ATTENTION_IMPLS = networks.ATTENTION_IMPLS
DTYPES = ('float32', 'bfloat16')
DECODES = ('argmax', 'draw')
# Fields that change what the model computes or its parameters: a resumed workdir
# must not silently continue with other values.
# (How the model is computed or trained — remat, conv_impl, attention_impl, dtype,
# the weighting of the training objective, the §4 gradient — may change between runs.)
_NOT_MODEL_DEFINING = ('remat', 'conv_impl', 'attention_impl', 'dtype', 'weighting',
                       'sigmoid_bias', 'sigmoid_scale', 'schedule_variance_reduction',
                       'antithetic_time_sampling')
MODEL_DEFINING = tuple(f'model.{k}' for k in config_base.get_config().model
                       if k not in _NOT_MODEL_DEFINING) + (
                           'data.dataset', 'data.augment')


# Model-defining fields added after configs were first saved, with the value that a
# config.json written before them implies.
_ADDED_LATER = {'model.channel_mult': (1,)}


class ConfigError(ValueError):
  """One or more config fields are invalid; the message lists each with the fix."""


def _flatten(config, prefix: str = '') -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _choice(errors, name, value, accepted):
  if value not in accepted:
    errors.append(f'config.{name} = {value!r} is not one of {", ".join(map(repr, accepted))}.')


def check_fields(config) -> list[str]:
  """Unknown keys and bad values, without touching data or devices."""
  errors = []
  known = _flatten(config_base.get_config())
  given = _flatten(config)
  for key in sorted(set(given) - set(known)):
    errors.append(f'config.{key} is not a known field (typo?). Known fields of '
                  f'config.{key.rsplit(".", 1)[0] if "." in key else ""}: '
                  + ', '.join(sorted(k.rsplit('.', 1)[-1] for k in known
                                     if k.rsplit('.', 1)[0] == key.rsplit('.', 1)[0])))
  m, t, o, d = config.model, config.training, config.optimizer, config.data
  _choice(errors, 'data.dataset', d.dataset, input_pipeline.DATASETS)
  _choice(errors, 'model.schedule', m.schedule, schedules.SCHEDULES)
  _choice(errors, 'model.schedule_endpoints', m.schedule_endpoints, schedules.ENDPOINTS)
  _choice(errors, 'model.weighting', m.weighting, vdm.WEIGHTINGS)
  _choice(errors, 'model.dtype', m.dtype, DTYPES)
  _choice(errors, 'model.conv_impl', m.conv_impl, CONV_IMPLS)
  _choice(errors, 'model.attention_impl', m.attention_impl, ATTENTION_IMPLS)
  _choice(errors, 'optimizer.decay', o.decay, optim.DECAYS)
  _choice(errors, 'sample.decode', config.sample.decode, DECODES)
  _choice(errors, 'eval.split', config.eval.split, input_pipeline.SPLITS)
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
                  'can follow the variance (SPEC §4).')
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
  errors += _check_ode_fields(config)
  if d.dataset == 'npz' and not d.npz_path:
    errors.append("config.data.npz_path is required with data.dataset = 'npz' "
                  '(a .npz with uint8 arrays train and test, [N, H, W, C]).')
  return errors


def _check_ode_fields(config) -> list[str]:
  """eval.estimator and the probability-flow ODE's section (vdm_jax/ode.py)."""
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


def validate(config, mesh=None) -> input_pipeline.DatasetInfo:
  """Checks the config, the devices and the data; returns the data's DatasetInfo."""
  errors = check_fields(config)
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))
  if mesh is not None:
    n = mesh.devices.size
    for name, value in (('training.batch_size', config.training.batch_size),
                        ('eval.batch_size', config.eval.batch_size)):
      if value % n:
        errors.append(f'config.{name} = {value} does not divide over the {n} devices; '
                      f'use a multiple of {n} (e.g. {(value // n + 1) * n}).')
  try:
    info = input_pipeline.dataset_info(config.data)
  except FileNotFoundError:
    raise
  except ValueError as e:  # bad user data: an 'error: …' on the command line
    raise ConfigError(f'Invalid data (config.data.dataset = {config.data.dataset!r}): '
                      f'{e}') from e
  if info.num_train < config.training.batch_size:
    errors.append(f'config.training.batch_size = {config.training.batch_size} exceeds the '
                  f'{info.num_train} training images of {info.name} (after '
                  'data.num_train); lower the batch size or use more training images.')
  if info.vocab_size != config.model.vocab_size:
    errors.append(f'config.model.vocab_size = {config.model.vocab_size} does not match the '
                  f'data: {info.name} has V = {info.vocab_size} values per sub-pixel; set '
                  f'--config.model.vocab_size={info.vocab_size}.')
  levels = len(config.model.channel_mult) - 1
  if info.height % 2**levels or info.width % 2**levels:
    errors.append(f'config.model.channel_mult = {tuple(config.model.channel_mult)} halves '
                  f'the image {levels} time(s), so H and W must divide by {2**levels}; '
                  f'{info.name} is {info.height}x{info.width}. Use fewer entries.')
  if config.data.augment and info.height != info.width:
    errors.append(f'config.data.augment = True rotates images, which needs H == W; '
                  f'{info.name} is {info.height}x{info.width}.')
  if errors:
    raise ConfigError('Invalid config:\n  ' + '\n  '.join(errors))
  return info


def config_difference(saved: dict, config, fields=MODEL_DEFINING) -> list[str]:
  """The model-defining fields whose value differs from the saved config.json."""
  flat_saved = _flatten(saved)
  flat_now = _flatten(config)
  diffs = []
  for key in fields:
    old = flat_saved.get(key, _ADDED_LATER.get(key, '<absent>'))
    new = flat_now.get(key, '<absent>')
    if isinstance(old, list):
      old = tuple(old)
    if isinstance(new, list):
      new = tuple(new)
    if old != new:
      diffs.append(f'{key}: saved {old!r}, now {new!r}')
  return diffs


def check_resumed_config(saved: dict, config, allow: bool = False) -> Optional[list[str]]:
  """Refuses to resume a workdir whose saved config defines another model."""
  diffs = config_difference(saved, config)
  if diffs and not allow:
    raise ConfigError(
        'This workdir was trained with a config that defines a different model:\n  '
        + '\n  '.join(diffs) + '\nUse the saved config (config.json in the workdir), '
        'another --workdir, or --allow_config_change to continue deliberately.')
  return diffs
