"""The noise-prediction network (SPEC §6): names, sizes, features, dropout, options."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax import config_base
from vdm_jax import networks
from vdm_jax import vdm


def _param_shapes(model_cfg, image_shape):
  model = vdm.VDM.from_config(model_cfg)
  x = jnp.zeros((1,) + image_shape, jnp.uint8)
  shapes = jax.eval_shape(lambda: model.init(common.rngs(), x, jnp.zeros((1,))))
  return flax.traverse_util.flatten_dict(shapes['params'], sep='/')


def _count(flat):
  return sum(math.prod(v.shape) for v in flat.values())


def test_cifar10_tree_has_the_original_names_and_size():
  """§6: 30,578,181 parameters, counted without allocating (jax.eval_shape)."""
  flat = _param_shapes(config_base.get_config().model, (32, 32, 3))
  assert _count(flat) == 30_578_181
  shapes = {k: v.shape for k, v in flat.items()}
  expected = {
      'gamma/w': (1,), 'gamma/b': (1,),
      'score_model/dense0/kernel': (129, 512), 'score_model/dense1/kernel': (512, 512),
      # z plus sin and cos at n ∈ {7, 8} for 3 channels: 3 + 2·2·3 = 15 inputs.
      'score_model/conv_in/kernel': (3, 3, 15, 128),
      'score_model/down.block_0/GroupNorm_0/scale': (128,),
      'score_model/down.block_0/cond_proj/kernel': (512, 128),
      'score_model/down.block_31/conv2/kernel': (3, 3, 128, 128),
      'score_model/mid.attn_1/q/kernel': (128, 128),
      'score_model/mid.attn_1/proj_out/bias': (128,),
      'score_model/mid.block_2/GroupNorm_1/bias': (128,),
      'score_model/up.block_0/conv1/kernel': (3, 3, 256, 128),
      'score_model/up.block_32/nin_shortcut/kernel': (256, 128),
      'score_model/GroupNorm_0/scale': (128,),
      'score_model/conv_out/kernel': (3, 3, 128, 3),
  }
  for name, shape in expected.items():
    assert shapes[name] == shape, name
  assert not any('down.attn' in k or 'up.attn' in k for k in shapes)
  assert 'score_model/up.block_33/conv1/kernel' not in shapes
  assert 'score_model/mid.block_1/nin_shortcut/kernel' not in shapes


@pytest.mark.parametrize('overrides,image_shape,count', [
    (dict(n_embd=256, schedule='learned_nnet'), (32, 32, 3), 122_140_677),
    (dict(n_embd=256, n_layer=64), (64, 64, 3), 237_603_845),
])
def test_paper_model_sizes(overrides, image_shape, count):
  cfg = config_base.get_config().model
  cfg.update(overrides)
  assert _count(_param_shapes(cfg, image_shape)) == count


def test_attention_everywhere_adds_blocks():
  cfg = common.tiny_model_config(with_attention=True, n_layer=2)
  flat = _param_shapes(cfg, (6, 10, 2))
  for name in ('down.attn_0', 'down.attn_1', 'up.attn_2', 'mid.attn_1'):
    assert f'score_model/{name}/q/kernel' in flat


def test_fourier_features_order_and_values():
  z = jax.random.normal(jax.random.key(0), (2, 3, 3, 2))
  got = networks.fourier_features(z, 7, 8)
  sines, cosines = [], []
  for c in range(2):  # channel-major within sines and within cosines (§6)
    for n in (7, 8):
      sines.append(jnp.sin(2.0 ** n * jnp.pi * z[..., c]))
      cosines.append(jnp.cos(2.0 ** n * jnp.pi * z[..., c]))
  want = jnp.stack(sines + cosines, axis=-1)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_timestep_embedding_values():
  t = jnp.array([0.0, 0.25])
  emb = networks.timestep_embedding(t, 8)
  half = 4
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
  arg = 1000.0 * np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.sin(arg), np.cos(arg)], 1),
                             rtol=1e-5, atol=1e-5)


def _net_and_params(**overrides):
  cfg = common.tiny_model_config(**{'p_drop': 0.5, **overrides})
  net = networks.make_score_model(cfg, name=None)
  z = jax.random.normal(jax.random.key(1), (2, 6, 10, 3))
  g = jnp.array([-3.0, 2.0])
  variables = net.init(jax.random.key(0), z, g, jnp.zeros((2,)))
  params = common.perturb(variables['params'], jax.random.key(2), scale=0.2)
  return net, params, z, g


def test_dropout_only_in_training_mode():
  net, params, z, g = _net_and_params()
  c = jnp.zeros((2,))
  apply = lambda det, key: net.apply({'params': params}, z, g, c, det,
                                     rngs={'dropout': jax.random.key(key)})
  np.testing.assert_array_equal(apply(True, 0), apply(True, 1))
  assert not np.allclose(apply(False, 0), apply(False, 1))
  assert not np.allclose(apply(False, 0), apply(True, 0))


def test_output_shape_channels_and_conditioning_matter():
  net, params, z, g = _net_and_params()
  out0 = net.apply({'params': params}, z, g, jnp.zeros((2,)))
  out1 = net.apply({'params': params}, z, g, jnp.ones((2,)))
  assert out0.shape == z.shape and out0.dtype == jnp.float32
  assert not np.allclose(out0, out1)
  # Fresh network: zero-init conv_out makes ε̂ = z exactly (the original's base measure).
  cfg = common.tiny_model_config()
  fresh = networks.make_score_model(cfg, name=None)
  v = fresh.init(jax.random.key(0), z, g, jnp.zeros((2,)))
  np.testing.assert_array_equal(fresh.apply(v, z, g, jnp.zeros((2,))), z)


def test_remat_changes_nothing_but_memory():
  net, params, z, g = _net_and_params(p_drop=0.0)
  remat = networks.make_score_model(
      common.tiny_model_config(p_drop=0.0, remat=True), name=None)
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, z, g, jnp.zeros((2,))) ** 2)
  a, ga = jax.value_and_grad(loss(net))(params)
  b, gb = jax.value_and_grad(loss(remat))(params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # Same operations, possibly fused differently: float32 rounding relative to each leaf.
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      u, v, rtol=1e-5, atol=1e-5 * float(jnp.abs(v).max())), ga, gb)


def test_bfloat16_compute_keeps_float32_params_and_output():
  net, params, z, g = _net_and_params(p_drop=0.0)
  bf = networks.make_score_model(
      common.tiny_model_config(p_drop=0.0, dtype='bfloat16'), name=None)
  v = bf.init(jax.random.key(0), z, g, jnp.zeros((2,)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  out = bf.apply({'params': params}, z, g, jnp.zeros((2,)))
  ref = net.apply({'params': params}, z, g, jnp.zeros((2,)))
  assert out.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: ~1e-2 relative through a few layers.
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))
