"""Import of the original code's checkpoints (vdm_jax/original.py; docs/maths.md §6, §8).

The checkpoints are written here in the original's format: flax.serialization.to_bytes
of {step, params, ema_params, opt_state} into checkpoints-0/ckpt-N.flax. Tiny variants
of the two released models stand in for them: the test config with learned_linear
(cifar10) and with learned_nnet, free endpoints, dropout and the conditioning flag
(cifar10_aug).
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import common
from vdm_jax import build
from vdm_jax.model import vdm
from vdm_jax import original
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 123
IMAGE_SHAPE = (8, 8, 1)  # sklearn digits, the test config's data


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(
      f'config_{name}', os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config(variant: str):
  config = _load_config('test')
  if variant == 'nnet':  # stands in for cifar10_aug
    config.data.augment = True
    config.model.n_embd = 16
    config.model.schedule = 'learned_nnet'
    config.model.schedule_endpoints = 'free'
    config.model.p_drop = 0.05
  else:  # stands in for cifar10
    assert config.model.schedule == 'learned_linear'
  return config


_SCHEDULE_INIT = {'gamma/w': 18.3, 'gamma/b': -13.3, 'gamma/l1/kernel': 18.3,
                  'gamma/l1/bias': -13.3}


def _original_params(config, seed: int):
  """Trained-looking parameters of our model's shapes: (model, params, ema), numpy.

  Shapes come from jax.eval_shape of model.init (nothing compiled); values are random
  (GroupNorm scales near 1, the schedule near its initialisation), and ema != params.
  """
  model = vdm.VDM.from_config(config.model)
  x = jnp.zeros((1,) + IMAGE_SHAPE, jnp.uint8)
  shapes = jax.eval_shape(model.init, common.rngs(0), x, jnp.zeros((1,)))['params']
  rng = np.random.default_rng(seed)

  def value(path, spec):
    name = '/'.join(str(p.key) for p in path)
    noise = rng.normal(0.0, 0.1, spec.shape).astype(spec.dtype)
    centre = _SCHEDULE_INIT.get(name, 1.0 if name.endswith('/scale') else 0.0)
    return (centre + noise).astype(spec.dtype)

  params = jax.tree_util.tree_map_with_path(value, shapes)
  ema = jax.tree.map(
      lambda p: (p + rng.normal(0.0, 0.01, p.shape)).astype(p.dtype), params)
  return model, params, ema


def _write_original(folder, params, ema, step=STEP, n=3, **extra):
  """A checkpoint as the original code writes it (clu: checkpoints-0/ckpt-N.flax)."""
  os.makedirs(folder, exist_ok=True)
  state = {'step': jnp.asarray(step, jnp.int32), 'params': params, 'ema_params': ema,
           'opt_state': optax.adamw(2e-4).init(params)}  # another layout; not imported
  state.update(extra)
  path = os.path.join(folder, f'ckpt-{n}.flax')
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(state))
  return path


def _flat(tree):
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope='module', params=['linear', 'nnet'])
def imported(request, tmp_path_factory):
  """An original checkpoint of one variant, imported and restored."""
  variant = request.param
  config = _config(variant)
  model, params, ema = _original_params(config, seed=0 if variant == 'linear' else 10)
  base = tmp_path_factory.mktemp(f'original_{variant}')
  folder = os.path.join(base, 'checkpoints-0')
  _write_original(folder, params, ema)
  workdir = os.path.join(base, 'workdir')
  # The linear variant reads the data's shape from the config; the nnet one is given it.
  shape = None if variant == 'linear' else IMAGE_SHAPE
  written = original.import_checkpoint(config, folder, workdir, image_shape=shape)
  run, state = build.restore(config, workdir)
  image_shape = run.image_shape
  return dict(variant=variant, config=config, model=model, params=params, ema=ema,
              folder=folder, workdir=workdir, written=written, state=state,
              image_shape=image_shape)


def test_import_restores_params_and_ema_bitwise(imported):
  state = imported['state']
  for name, want in (('params', imported['params']), ('ema_params', imported['ema'])):
    got = _flat(jax.device_get(getattr(state, name)))
    want = _flat(want)
    assert set(got) == set(want)
    for key in want:
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key], err_msg=f'{name} {key}')
  assert not np.array_equal(_flat(imported['params'])['score_model/conv_in/kernel'],
                            _flat(imported['ema'])['score_model/conv_in/kernel'])
  if imported['variant'] == 'nnet':
    assert set(state.params['gamma']) == {'l1', 'l2', 'l3'}
  else:
    assert set(state.params['gamma']) == {'w', 'b'}


def test_import_restores_step_and_writes_config(imported):
  assert int(jax.device_get(imported['state'].step)) == STEP
  assert imported['written'] == os.path.join(
      os.path.abspath(imported['workdir']), workdir_lib.CHECKPOINT_DIR)
  assert imported['image_shape'] == IMAGE_SHAPE
  saved = workdir_lib.Workdir(imported['workdir']).read_config()
  assert saved is not None
  assert not validation.config_difference(saved, imported['config'])
  assert saved['model']['schedule'] == imported['config'].model.schedule


def test_import_gives_the_same_bound_terms(imported):
  """§3 terms with the original's and the restored parameters, same draws: equal."""
  model, state = imported['model'], imported['state']
  x = jax.random.randint(jax.random.key(5), (4,) + IMAGE_SHAPE, 0, 17).astype(jnp.uint8)
  cond = jnp.array([0.0, 1.0, 0.0, 1.0])
  rngs = {'sample': jax.random.key(6), 'dropout': jax.random.key(7)}
  bound = jax.jit(lambda p: model.apply({'params': p}, x, cond, deterministic=False,
                                        rngs=rngs))
  outs = {}
  for name, orig, restored in (('params', imported['params'], state.params),
                               ('ema', imported['ema'], state.ema_params)):
    a, b = bound(orig), bound(jax.device_get(restored))
    for term in ('loss_recon', 'loss_klz', 'loss_diff'):
      np.testing.assert_array_equal(getattr(a, term), getattr(b, term),
                                    err_msg=f'{name} {term}')
      assert np.all(np.isfinite(getattr(a, term)))
    outs[name] = a
  # The perturbation matters: params and EMA give different diffusion terms.
  assert not np.array_equal(outs['params'].loss_diff, outs['ema'].loss_diff)


def test_refuses_a_workdir_with_checkpoints(imported):
  before = sorted(os.listdir(imported['written']))
  with pytest.raises(FileExistsError, match='already holds checkpoints'):
    original.import_checkpoint(imported['config'], imported['folder'],
                               imported['workdir'], image_shape=IMAGE_SHAPE)
  assert sorted(os.listdir(imported['written'])) == before


def test_mismatch_names_every_offending_parameter(tmp_path):
  config = _config('linear')
  _, params, ema = _original_params(config, seed=0)
  bad = jax.tree.map(lambda v: v, params)  # new dicts, same arrays
  conv_in = bad['score_model']['conv_in']
  conv_in['kernel'] = np.zeros(conv_in['kernel'].shape[:2] + (4, 8), np.float32)
  attn = bad['score_model']['mid.attn_1']
  attn['query'] = attn.pop('q')
  del bad['gamma']['b']
  folder = tmp_path / 'checkpoints-0'
  _write_original(folder, bad, ema)
  workdir = tmp_path / 'workdir'
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    original.import_checkpoint(config, folder, workdir, image_shape=IMAGE_SHAPE)
  message = str(e.value)
  for name in ('score_model/conv_in/kernel', 'score_model/mid.attn_1/q/kernel',
               'score_model/mid.attn_1/query/kernel', 'score_model/mid.attn_1/q/bias',
               'gamma/b'):
    assert name in message, (name, message)
  assert re.search(r'conv_in/kernel checkpoint \(3, 3, 4, 8\) vs model \(3, 3, 5, 8\)',
                   message), message
  assert 'score_model/conv_out/kernel' not in message  # only what differs is named
  assert not workdir.exists()  # nothing written on failure


def test_mismatch_of_the_schedule_says_what_the_checkpoint_holds(tmp_path):
  """A learned_linear checkpoint read with a learned_nnet config (cifar10 vs _aug)."""
  _, params, ema = _original_params(_config('linear'), seed=0)
  folder = tmp_path / 'checkpoints-0'
  _write_original(folder, params, ema)
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    original.import_checkpoint(_config('nnet'), folder, tmp_path / 'w',
                               image_shape=IMAGE_SHAPE)
  message = str(e.value)
  for name in ('gamma/w', 'gamma/b', 'gamma/l1/kernel', 'gamma/l2/kernel',
               'gamma/l3/kernel', 'score_model/conv_in/kernel'):
    assert name in message, (name, message)
  assert 'holds: schedule learned_linear, n_embd 8, n_layer 1' in message, message
  assert 'builds: schedule learned_nnet, free endpoints, n_embd 16' in message, message


def test_released_models_shapes_and_their_mismatch():
  """The real cifar10 / cifar10_aug configs, shapes only (jax.eval_shape; §6 counts)."""
  abstract = {}
  for name, count in (('cifar10', 30_578_181), ('cifar10_aug', 122_140_677)):
    model = vdm.VDM.from_config(_load_config(name).model)
    abstract[name] = jax.eval_shape(model.init, common.rngs(0),
                                    jnp.zeros((1, 32, 32, 3), jnp.uint8),
                                    jnp.zeros((1,)))['params']
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract[name])) == count
  assert original.summarize(abstract['cifar10']) == (
      'schedule learned_linear, n_embd 128, n_layer 32, attention off, '
      '3 image channel(s), 2 Fourier frequencies')
  assert original.summarize(abstract['cifar10_aug']).startswith(
      'schedule learned_nnet, free endpoints, n_embd 256, n_layer 32')
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    original.match_params(abstract['cifar10'], abstract['cifar10_aug'], 'params', 'f')
  message = str(e.value)
  assert 'score_model/up.block_32/nin_shortcut/kernel checkpoint (256, 128) vs model ' \
         '(512, 256)' in message
  assert '… and' not in message  # every parameter is named, none elided


# ------------------------------------------------------------------ reading
def test_read_takes_the_largest_checkpoint_number(tmp_path):
  params = {'gamma': {'w': np.ones((1,), np.float32), 'b': np.zeros((1,), np.float32)}}
  folder = tmp_path / 'checkpoints-0'
  _write_original(folder, params, params, step=900, n=9)
  _write_original(folder, params, params, step=1000, n=10)  # 10 > 9, though '10' < '9'
  (folder / 'checkpoint').write_text('clu bookkeeping, ignored')
  assert original.read_original(folder)['step'] == 1000
  # The file itself, and the folder above checkpoints-0/, work too.
  assert original.read_original(folder / 'ckpt-9.flax')['step'] == 900
  got = original.read_original(tmp_path)
  assert got['step'] == 1000 and got['file'] == str(folder / 'ckpt-10.flax')
  np.testing.assert_array_equal(got['ema_params']['gamma']['w'], [1.0])


def test_read_unwraps_a_params_nesting(tmp_path):
  params = {'gamma': {'w': np.ones((1,), np.float32), 'b': np.zeros((1,), np.float32)}}
  path = _write_original(tmp_path, {'params': params}, {'params': params})
  got = original.read_original(path)
  assert set(got['params']) == {'gamma'} and set(got['ema_params']) == {'gamma'}
  assert got['opt_state'] is not None


def test_read_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    original.read_original(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No ckpt-N.flax'):
    original.read_original(tmp_path / 'empty')
  garbage = tmp_path / 'garbage' / 'ckpt-1.flax'
  garbage.parent.mkdir()
  garbage.write_bytes(b'\x00not a checkpoint at all' * 10)
  with pytest.raises(original.OriginalCheckpointError, match='not a readable'):
    original.read_original(garbage.parent)
  params = {'gamma': {'w': np.ones((1,), np.float32), 'b': np.zeros((1,), np.float32)}}
  path = _write_original(tmp_path / 'cut', params, params)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(original.OriginalCheckpointError, match='truncated'):
    original.read_original(path)
  lacking = tmp_path / 'lacking' / 'ckpt-1.flax'
  lacking.parent.mkdir()
  lacking.write_bytes(flax.serialization.to_bytes({'step': 1, 'params': params}))
  with pytest.raises(original.OriginalCheckpointError, match='lacks ema_params'):
    original.read_original(lacking)
  scalar = tmp_path / 'scalar' / 'ckpt-1.flax'
  scalar.parent.mkdir()
  scalar.write_bytes(flax.serialization.to_bytes(5))
  with pytest.raises(original.OriginalCheckpointError, match="holds 'int' data"):
    original.read_original(scalar)


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_cli_import_then_eval_and_sample(tmp_path):
  config = _config('linear')  # exactly configs/test.py
  _, params, ema = _original_params(config, seed=0)
  folder = tmp_path / 'checkpoints-0'
  _write_original(folder, params, ema)
  workdir = tmp_path / 'workdir'
  env = dict(os.environ, JAX_PLATFORMS='cpu')

  def cli(*args):
    cmd = [sys.executable, '-m', 'vdm_jax.main', '--config=configs/test.py',
           f'--workdir={workdir}', *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout

  out = cli('--mode=import_original', f'--original_checkpoint={folder}')
  assert 'imported' in out
  out = cli('--mode=eval', '--config.eval.num_examples=16')
  m = re.search(r'test bpd ([0-9.]+) ± ([0-9.]+) \((\d+) images', out)
  assert m, out
  bpd = float(m.group(1))
  assert math.isfinite(bpd) and bpd > 0 and int(m.group(3)) == 16, out
  assert f'step {STEP}' in out, out
  results = json.loads(out[out.index('{'):])
  assert results['step'] == STEP and results['params'] == 'ema'
  out = cli('--mode=sample')
  m = re.search(r'samples written to (\S+)', out)
  assert m and os.path.exists(m.group(1)), out
