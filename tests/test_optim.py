"""The weight-decay masks, checked on the real parameter trees (§8)."""

import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from configs import cifar10
from vdm_jax.model import vdm
from vdm_jax.training import optim

_BLOCK_SCALES = ('GroupNorm_0/scale', 'GroupNorm_1/scale')
_BLOCK_KERNELS = ('cond_proj/kernel', 'conv1/kernel', 'conv2/kernel')


def _param_shapes(model_cfg, image_shape):
  """The parameter tree's shapes, from jax.eval_shape (nothing is computed)."""
  model = vdm.VDM.from_config(model_cfg)
  x = jnp.zeros((1,) + image_shape, jnp.uint8)
  variables = jax.eval_shape(
      lambda: model.init(common.rngs(0), x, jnp.zeros((1,), jnp.float32)))
  return variables['params']


def _decayed(mask) -> set:
  flat = flax.traverse_util.flatten_dict(mask, sep='/')
  return {path for path, decay in flat.items() if decay}


def _cifar10_expected(with_scales_and_schedule: bool) -> set:
  """The decayed parameters of the CIFAR-10 network, written out from §6."""
  kernels, scales = set(), set()
  blocks = ([f'down.block_{i}' for i in range(32)] + ['mid.block_1', 'mid.block_2']
            + [f'up.block_{i}' for i in range(33)])
  for block in blocks:
    kernels |= {f'score_model/{block}/{name}' for name in _BLOCK_KERNELS}
    scales |= {f'score_model/{block}/{name}' for name in _BLOCK_SCALES}
    if block.startswith('up.'):  # 256 -> 128 channels: a projected shortcut
      kernels.add(f'score_model/{block}/nin_shortcut/kernel')
  kernels |= {f'score_model/{name}/kernel'
              for name in ('conv_in', 'conv_out', 'dense0', 'dense1')}
  kernels |= {f'score_model/mid.attn_1/{name}/kernel' for name in ('q', 'k', 'v', 'proj_out')}
  scales |= {'score_model/GroupNorm_0/scale', 'score_model/mid.attn_1/GroupNorm_0/scale'}
  if not with_scales_and_schedule:
    return kernels
  return kernels | scales | {'gamma/w', 'gamma/b'}


def test_cifar10_config_decays_all_but_biases():
  config = cifar10.get_config()
  assert config.optimizer.weight_decay_mask == 'all_but_biases'
  params = _param_shapes(config.model, (32, 32, 3))
  decayed = _decayed(optim.weight_decay_mask(params, config.optimizer.weight_decay_mask))
  assert decayed == _cifar10_expected(with_scales_and_schedule=True)
  spared = set(flax.traverse_util.flatten_dict(params, sep='/')) - decayed
  assert spared and all(path.endswith('/bias') for path in spared)
  # 32 blocks down, 2 in the middle, 33 up, each 5 (+1 up) decayed; 4 attention kernels,
  # 2 outer GroupNorm scales, conv_in/out, dense0/1 and the schedule's w, b.
  assert len(decayed) == 67 * 5 + 33 + 4 + 2 + 4 + 2


@pytest.mark.parametrize('name', ['cifar10', 'cifar10_aug', 'imagenet32', 'imagenet64'])
def test_paper_configs_use_the_original_mask(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.optimizer.weight_decay_mask == 'all_but_biases'


def test_cifar10_kernels_mask_decays_network_kernels_only():
  config = cifar10.get_config()
  params = _param_shapes(config.model, (32, 32, 3))
  decayed = _decayed(optim.weight_decay_mask(params, 'kernels'))
  assert decayed == _cifar10_expected(with_scales_and_schedule=False)


@pytest.mark.parametrize('kind, expected', [
    ('all_but_biases', {'gamma/l1/kernel', 'gamma/l2/kernel', 'gamma/l3/kernel',
                        'gamma/gamma_0', 'gamma/gamma_1'}),
    ('kernels', set()),
])
def test_network_schedule_kernels_follow_the_mask(kind, expected):
  model_cfg = common.tiny_model_config(schedule='learned_nnet', schedule_endpoints='pinned')
  params = _param_shapes(model_cfg, (8, 8, 1))
  decayed = _decayed(optim.weight_decay_mask(params, kind))
  assert {p for p in decayed if p.startswith('gamma/')} == expected


@pytest.mark.parametrize('kind', optim.WEIGHT_DECAY_MASKS)
def test_optimizer_applies_the_mask(kind):
  """With zero gradients, AdamW moves exactly the decayed parameters, by lr·wd·p."""
  opt = cifar10.get_config().optimizer
  opt.weight_decay_mask, opt.warmup_steps, opt.weight_decay = kind, 0, 0.5
  params = {'gamma': {'w': jnp.ones(1), 'b': jnp.ones(1)}, 'score_model': {
      'conv_in': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
      'GroupNorm_0': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}}
  tx = optim.make_optimizer(opt, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  moved = {path for path, u in flax.traverse_util.flatten_dict(updates, sep='/').items()
           if np.any(np.asarray(u) != 0)}
  assert moved == _decayed(optim.weight_decay_mask(params, kind))
  np.testing.assert_allclose(updates['score_model']['conv_in']['kernel'],
                             -opt.learning_rate * 0.5, rtol=1e-6)


def test_unknown_mask_is_refused():
  with pytest.raises(ValueError, match='weight_decay_mask'):
    optim.weight_decay_mask({'a': {'kernel': 1}}, 'everything')
