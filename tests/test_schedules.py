"""Noise schedules (docs/maths.md §2): monotone, endpoints, scalars and arrays, γ' by jvp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax.model import schedules

GMIN, GMAX = -13.3, 5.0
T_GRID = jnp.linspace(0.0, 1.0, 1001)


def _schedule(name, endpoints='free'):
  cfg = common.tiny_model_config(schedule=name, schedule_endpoints=endpoints)
  return schedules.make_schedule(cfg, name=None)


def _init(module):
  return module.init(jax.random.key(0), T_GRID)


@pytest.mark.parametrize('name,endpoints', [
    ('fixed_linear', 'free'), ('learned_linear', 'free'),
    ('learned_nnet', 'free'), ('learned_nnet', 'pinned')])
def test_initial_schedule_is_the_linear_one(name, endpoints):
  module = _schedule(name, endpoints)
  variables = _init(module)
  g = module.apply(variables, T_GRID)
  linear = GMIN + (GMAX - GMIN) * T_GRID
  # The nnet's l3 term is at most 1024·0.01·|N(0,1)| / 1024 in size: ~1e-2 (§2).
  tol = 5e-2 if name == 'learned_nnet' else 1e-5
  np.testing.assert_allclose(g, linear, atol=tol)
  assert np.all(np.diff(np.asarray(g)) > 0)


@pytest.mark.parametrize('name', ['fixed_linear', 'learned_linear', 'learned_nnet'])
def test_scalars_and_arrays(name):
  module = _schedule(name)
  variables = _init(module)
  for t in (0.3, jnp.float32(0.3), jnp.array(0.3)):
    out = module.apply(variables, t)
    assert isinstance(out, jax.Array) and out.shape == ()
  out = module.apply(variables, jnp.full((2, 3), 0.3))
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out, module.apply(variables, 0.3), rtol=1e-6)


@pytest.mark.parametrize('endpoints', ['free', 'pinned'])
def test_nnet_stays_increasing_for_any_parameters(endpoints):
  module = _schedule('learned_nnet', endpoints)
  variables = _init(module)
  for seed in range(5):
    params = common.perturb(variables['params'], jax.random.key(seed), scale=3.0)
    g = np.asarray(module.apply({'params': params}, T_GRID))
    assert np.all(np.diff(g) >= -1e-4 * np.abs(g).max()), seed


def test_pinned_endpoints_are_exact_whatever_the_shape():
  module = _schedule('learned_nnet', 'pinned')
  variables = _init(module)
  params = common.bend_nnet_schedule(variables['params'], jax.random.key(1))
  params = dict(params, gamma_0=jnp.float32(-7.5), gamma_1=jnp.float32(3.25))
  g0, g1 = module.apply({'params': params}, jnp.array([0.0, 1.0]))
  assert float(g0) == -7.5 and float(g1) == 3.25
  shape = module.apply({'params': params}, T_GRID, method=module.shape)
  assert float(shape[0]) == 0.0 and abs(float(shape[-1]) - 1.0) < 1e-6
  # The shape is genuinely non-linear after the perturbation.
  assert float(jnp.max(jnp.abs(shape - T_GRID))) > 0.1


def test_learned_linear_parameters_are_the_originals():
  variables = _init(_schedule('learned_linear'))
  p = variables['params']
  assert set(p) == {'w', 'b'} and p['w'].shape == (1,) and p['b'].shape == (1,)
  assert float(p['w'][0]) == np.float32(GMAX - GMIN) and float(p['b'][0]) == np.float32(GMIN)


def test_nnet_parameters_are_the_originals():
  p = _init(_schedule('learned_nnet'))['params']
  shapes = {k: {n: v.shape for n, v in p[k].items()} for k in p}
  assert shapes == {'l1': {'kernel': (1, 1), 'bias': (1,)},
                    'l2': {'kernel': (1, 1024), 'bias': (1024,)},
                    'l3': {'kernel': (1024, 1)}}
  pinned = _init(_schedule('learned_nnet', 'pinned'))['params']
  assert set(pinned) == {'l1', 'l2', 'l3', 'gamma_0', 'gamma_1'}


@pytest.mark.parametrize('name', ['fixed_linear', 'learned_linear', 'learned_nnet'])
def test_derivative_by_jvp(name):
  module = _schedule(name, 'pinned' if name == 'learned_nnet' else 'free')
  variables = _init(module)
  params = common.perturb(variables.get('params', {}), jax.random.key(3), scale=1.0)
  fn = lambda t: module.apply({'params': params}, t)
  t = jnp.linspace(0.05, 0.95, 19)
  _, d = schedules.gamma_and_derivative(fn, t)
  h = 1e-3  # central differences in float32: error ~ γ''' h² + ε|γ|/h ~ 1e-2 relative
  fd = (fn(t + h) - fn(t - h)) / (2 * h)
  np.testing.assert_allclose(d, fd, rtol=2e-2, atol=0.05)
  if name == 'fixed_linear':
    np.testing.assert_allclose(d, GMAX - GMIN, rtol=1e-6)


def test_unknown_schedule_is_named():
  with pytest.raises(ValueError, match=r"model.schedule must be one of .*'cosine'"):
    _schedule('cosine')
  with pytest.raises(ValueError, match='schedule_endpoints'):
    _init(_schedule('learned_nnet', 'loose'))
