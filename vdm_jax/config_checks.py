"""Config checks of the sections beside the core fields: the time proposals, the mulan
schedule, the ODE, the codec and sample quality. vdm_jax/validation.py runs them with the
others; each returns its messages (field, value given, what is accepted).
"""

from vdm_jax.data import datasets
from vdm_jax.evaluation import feature_net
from vdm_jax.evaluation import ode
from vdm_jax.model import multivariate
from vdm_jax.model import time_sampling


def choice(errors, name, value, accepted):
  if value not in accepted:
    errors.append(f'config.{name} = {value!r} is not one of {", ".join(map(repr, accepted))}.')


def check_multivariate(config) -> list[str]:
  """The mulan schedule's fields, and what does not work with it yet (docs/maths.md §13)."""
  errors, m = [], config.model
  if m.schedule != multivariate.NAME:
    return errors
  for name, low in (('mulan_latent_draws', 0), ('mulan_latent_classes', 2),
                    ('mulan_hidden', 4)):
    if not (isinstance(m[name], int) and m[name] >= low):
      errors.append(f'config.model.{name} = {m[name]!r}: must be an integer ≥ {low}.')
  if m.time_sampling == 'sigmoid':
    errors.append("config.model.time_sampling = 'sigmoid' draws one noise level γ per "
                  "image, which the mulan schedule does not have (each sub-pixel has its "
                  "own); use 'adaptive' (a proposal over t, docs/maths.md §13.5), "
                  "'antithetic' or 'uniform'.")
  if m.second_order_weight:
    errors.append(f'config.model.second_order_weight = {m.second_order_weight}: the '
                  "second-order term takes one γ per image, which model.schedule = 'mulan' "
                  'does not have; set it to 0.')
  if config.eval.estimator == 'ode':
    errors.append("config.eval.estimator = 'ode' is not available for model.schedule = "
                  "'mulan' (the probability-flow ODE here takes one γ per image); use "
                  "eval.estimator = 'bound'.")
  return errors


def check_time_sampling(m) -> list[str]:
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


def check_ode_fields(config) -> list[str]:
  """eval.estimator and the probability-flow ODE's section (vdm_jax/evaluation/ode.py)."""
  errors, o = [], config.ode
  choice(errors, 'eval.estimator', config.eval.estimator, ('bound', 'ode'))
  choice(errors, 'ode.solver', o.solver, ode.SOLVERS)
  choice(errors, 'ode.trace', o.trace, ode.TRACES)
  choice(errors, 'ode.probe', o.probe, ode.PROBES)
  choice(errors, 'ode.dequantisation', o.dequantisation, ode.DEQUANTISATIONS)
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


def check_codec_fields(c) -> list[str]:
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
  choice(errors, 'codec.step_placement', c.step_placement, ('uniform', 'rate'))
  return errors


def check_quality_fields(config) -> list[str]:
  """config.quality: the sample-quality numbers of --mode=sample (docs/maths.md §12)."""
  errors, q = [], config.quality
  choice(errors, 'quality.features', q.features, feature_net.FEATURES)
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
