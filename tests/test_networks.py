"""The noise-prediction network (docs/maths.md §6): names, sizes, features, dropout, options."""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common
from vdm_jax import config_base
from vdm_jax.model import networks
from vdm_jax.model import vdm


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
  variables = jax.jit(net.init)(jax.random.key(0), z, g, jnp.zeros((2,)))  # eager: slow
  params = common.perturb(variables['params'], jax.random.key(2), scale=0.2)
  return net, params, z, g


def test_dropout_only_in_training_mode():
  net, params, z, g = _net_and_params()
  c = jnp.zeros((2,))
  apply = jax.jit(lambda det, key: net.apply({'params': params}, z, g, c, det, rngs={
      'dropout': jax.random.key(key)}), static_argnums=0)  # op by op: slow
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
  v = jax.jit(fresh.init)(jax.random.key(0), z, g, jnp.zeros((2,)))
  np.testing.assert_array_equal(fresh.apply(v, z, g, jnp.zeros((2,))), z)


def test_bfloat16_compute_keeps_float32_params_and_output():
  net, params, z, g = _net_and_params(p_drop=0.0)
  bf = networks.make_score_model(
      common.tiny_model_config(p_drop=0.0, dtype='bfloat16'), name=None)
  v = jax.jit(bf.init)(jax.random.key(0), z, g, jnp.zeros((2,)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
  out = bf.apply({'params': params}, z, g, jnp.zeros((2,)))
  ref = net.apply({'params': params}, z, g, jnp.zeros((2,)))
  assert out.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: ~1e-2 relative through a few layers.
  np.testing.assert_allclose(out, ref, atol=0.1 * float(jnp.abs(ref).max()))


def test_remat_draws_the_same_dropout_masks():
  """Training mode, same rng: remat's recomputation reuses the forward pass's masks.

  Values and gradients (parameters, z and the conditioning, hence `cond`) equal the
  plain network's; with other masks in the backward pass they would not.
  """
  kw = dict(p_drop=0.5, n_layer=2, with_attention=True)
  net, params, z, g = _net_and_params(**kw)
  remat = networks.make_score_model(
      common.tiny_model_config(remat=True, **kw), name=None)
  c = jnp.array([0.0, 1.0])
  inits = [jax.jit(m.init)(jax.random.key(0), z, g, c) for m in (net, remat)]
  assert jax.tree.structure(inits[0]) == jax.tree.structure(inits[1])
  jax.tree.map(np.testing.assert_array_equal, *inits)

  def loss(m):
    return jax.jit(jax.value_and_grad(lambda p, z, c, key: jnp.sum(m.apply(
        {'params': p}, z, g, c, False, rngs={'dropout': key}) ** 2), argnums=(0, 1, 2)))

  key = jax.random.key(3)
  a, ga = loss(net)(params, z, c, key)
  remat_loss = loss(remat)
  b, gb = remat_loss(params, z, c, key)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # Leaves like attention's k bias have a zero gradient up to rounding: atol is
  # relative to the largest gradient.
  scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(ga))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      u, v, rtol=1e-5, atol=1e-6 * scale), ga, gb)
  assert not np.isclose(a, remat_loss(params, z, c, jax.random.key(4))[0])  # dropout on


def test_remat_cuts_the_compiled_gradient_temp_memory():
  """XLA's memory analysis of the compiled gradient (compiled only, never run).

  With A = one [B, H, W, C] activation and L = n_layer = 6 (2L + 3 = 15 residual
  blocks): the plain backward pass keeps every block's inner activations, ≥ 5 A
  each (GroupNorm outputs, conv1 + cond, the dropout output; the up blocks' 2C-
  channel input side more), ≈ 15·5 A + 7 skips + 7 × 3 A ≈ 100 A. With remat it
  keeps the block inputs (7 skips, 7 up-path inputs, 3 mid: 17 A), the skips'
  cotangents from the up path (≤ 7 A) and one block's recomputation (≈ 15 A):
  ≈ 40 A, a ratio ≥ 2.5; the test asks for 3 (measured at 8×8, n_embd 32,
  batch 8: 209 A vs 36 A, 5.8×). The mid attention's B·(HW)² map is only 2 A here.
  """
  z = jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32)
  g, c = jnp.zeros((8,)), jnp.zeros((8,))
  temp = {}
  for remat in (False, True):
    net = networks.make_score_model(common.tiny_model_config(
        n_embd=32, n_layer=6, groupnorm_groups=8, remat=remat), name=None)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(z.shape), g, c))
    loss = lambda p, z: jnp.sum(net.apply(p, z, g, c, False, rngs={
        'dropout': jax.random.key(0)}) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, z).compile()
    temp[remat] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[True] < temp[False] / 3, temp


def test_dropout_draws_flax_dropout_masks():
  """networks.Dropout (key tied to its input) equals nn.Dropout under the same rngs."""
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 8))

  class Flax(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dropout(0.3)(x, deterministic=False)

  class Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
      return networks.Dropout(0.3, name='Dropout_0')(x, False)

  rngs = {'dropout': jax.random.key(5)}
  ours = Ours().apply({}, x, rngs=rngs)
  np.testing.assert_array_equal(ours, Flax().apply({}, x, rngs=rngs))
  # 800 draws, keep probability 0.7: the dropped share is 0.3 ± 0.016 (1σ).
  assert abs(float(jnp.mean(ours == 0)) - 0.3) < 0.1
  np.testing.assert_array_equal(networks.Dropout(0.3).apply({}, x, True), x)


def _attention_by_the_formula(params, x, groups):
  """x + proj_out(softmax(q kᵀ / √C) v) with the softmax written out (§6)."""
  b, height, width, c = x.shape
  h = nn.GroupNorm(groups).apply({'params': params['GroupNorm_0']}, x)
  dense = lambda name: (h @ params[name]['kernel'] + params[name]['bias']).reshape(
      b, height * width, c)
  q, k, v = dense('q'), dense('k'), dense('v')
  logits = q @ jnp.swapaxes(k, 1, 2) / math.sqrt(c)
  out = (jax.nn.softmax(logits, axis=-1) @ v).reshape(x.shape)
  return x + out @ params['proj_out']['kernel'] + params['proj_out']['bias'], logits


@pytest.mark.parametrize('logit_scale', [1.0, 30.0])
def test_attention_matches_the_softmax_formula(logit_scale):
  """Value and input gradient equal the textbook softmax, also with logits ~10³.

  The block normalises after multiplying by v and subtracts the row maximum; both
  are exact rewrites, so float32 rounding (~1e-6 relative) is the only difference.
  """
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  block = networks.AttnBlock(groups=4)
  params = common.perturb(block.init(jax.random.key(1), x)['params'],
                          jax.random.key(3), scale=0.5)
  params['q']['kernel'] = params['q']['kernel'] * logit_scale
  params['k']['kernel'] = params['k']['kernel'] * logit_scale
  ours = lambda x: block.apply({'params': params}, x)
  ref = lambda x: _attention_by_the_formula(params, x, 4)[0]
  logits = _attention_by_the_formula(params, x, 4)[1]
  # At scale 30 a plain exp(logits) overflows float32 (logit > 88.7).
  assert (float(logits.max()) > 88.7) == (logit_scale > 1)
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-5, atol=1e-5)
  cot = jax.random.normal(jax.random.key(2), x.shape)
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cot))(x)
  np.testing.assert_allclose(grad(ours), grad(ref), rtol=1e-4, atol=1e-4)


def test_chunked_attention_equals_batched_in_value_and_gradient():
  """A loop over chunks of 2 interleaved images computes the same function (up to
  float32 summation order) as the batched einsum."""
  q, k, v = (jax.random.normal(jax.random.key(i), (6, 16, 8)) for i in range(3))
  cot = jax.random.normal(jax.random.key(3), (6, 16, 8))
  def value_and_grads(chunk):
    f = lambda q, k, v: jnp.sum(networks.dot_product_attention(q, k, v, chunk) * cot)
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
  ref, ref_grads = value_and_grads(0)
  out, grads = value_and_grads(2)
  np.testing.assert_allclose(out, ref, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='does not divide the batch 6'):
    networks.dot_product_attention(q, k, v, 4)

def test_chunked_attention_backward_recomputes_the_weights():
  """The gradient of the chunked form keeps no [B, N, N] array alive: its compiled
  temporary memory (a few [2, N, N] chunk arrays: logits, weights, cotangents) stays
  below the B·N² float32 softmax weights that storing them for the backward pass
  would take on their own (without jax.checkpoint it is 2.5× that)."""
  b, n, c = 16, 256, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (b, n, c)) for i in range(3))
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(networks.dot_product_attention(
      q, k, v, 2) ** 2), argnums=(0, 1, 2)))
  temp = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  all_weights = b * n * n * 4
  assert temp < all_weights, (temp, all_weights)


def test_images_per_chunk():
  # 28×28: N² = 614,656, so 2 images pass 2^20; 32×32: N² = 2^20 exactly.
  assert networks.images_per_chunk(32, 784) == 2
  assert networks.images_per_chunk(25, 784) == 5   # the smallest divisor ≥ 2
  assert networks.images_per_chunk(8, 1024) == 1
  assert networks.images_per_chunk(4, 16) == 4     # small images: one chunk
  assert networks.resolve_attention_impl('auto') == 'chunked'  # tests run on CPU
  with pytest.raises(ValueError, match='attention impl must be one of'):
    networks.resolve_attention_impl('flash')


def test_downsample_averages_each_2x2_block():
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
  expected = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4
  np.testing.assert_allclose(networks.downsample(x), expected, rtol=1e-6, atol=1e-6)


def test_upsample_repeats_each_pixel_before_its_convolution():
  x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
  up = networks.Upsample()
  kernel = jnp.zeros((3, 3, 4, 4)).at[1, 1].set(jnp.eye(4))  # identity convolution
  y = up.apply({'params': {'conv': {'kernel': kernel, 'bias': jnp.zeros((4,))}}}, x)
  assert y.shape == (2, 6, 4, 4)
  for di in (0, 1):
    for dj in (0, 1):
      np.testing.assert_allclose(y[:, di::2, dj::2], x, rtol=1e-6, atol=1e-6)


def test_channel_mult_builds_a_u_net_of_the_given_widths():
  """(1, 2) on 8×8: blocks of 8 channels at 8×8 and 16 at 4×4; skips as in DDPM."""
  flat = _param_shapes(common.tiny_model_config(channel_mult=(1, 2)), (8, 8, 1))
  shapes = {k.split('/', 1)[1]: v.shape for k, v in flat.items() if k.startswith('score_')}
  expected = {
      'conv_in/kernel': (3, 3, 5, 8),
      'down.block_0/conv1/kernel': (3, 3, 8, 8),
      'down.block_1/conv1/kernel': (3, 3, 8, 16),  # first block of the 4×4 level
      'down.block_1/nin_shortcut/kernel': (8, 16),
      'mid.attn_1/q/kernel': (16, 16),
      'up.block_0/conv1/kernel': (3, 3, 32, 16),  # h 16 + skip down.block_1 16
      'up.block_1/conv1/kernel': (3, 3, 24, 16),  # h 16 + skip pooled down.block_0 8
      'up.upsample_1/conv/kernel': (3, 3, 16, 16),
      'up.block_2/conv1/kernel': (3, 3, 24, 8),  # h 16 + skip down.block_0 8
      'up.block_3/conv1/kernel': (3, 3, 16, 8),  # h 8 + skip conv_in 8
      'conv_out/kernel': (3, 3, 8, 1),
  }
  for name, shape in expected.items():
    assert shapes[name] == shape, name
  assert 'up.block_4/conv1/kernel' not in shapes and 'down.block_2/conv1/kernel' not in shapes


@pytest.mark.slow  # the gradient of a two-level U-Net, op by op (~20 s)
def test_channel_mult_every_level_is_trained():
  """Every parameter of every resolution gets a gradient."""
  cfg = common.tiny_model_config(channel_mult=(1, 2), p_drop=0.0)
  net = networks.make_score_model(cfg, name=None)
  z = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  g = jnp.array([0.0, 2.0])
  params = common.perturb(
      jax.jit(net.init)(jax.random.key(0), z, g, jnp.zeros((2,)))['params'],
      jax.random.key(2), scale=0.2)
  loss = lambda p: jnp.sum(net.apply({'params': p}, z, g, jnp.zeros((2,))) ** 2)
  grads = jax.jit(jax.grad(loss))(params)  # op by op, a U-Net's gradient takes ~4x longer
  for name, leaf in flax.traverse_util.flatten_dict(grads, sep='/').items():
    assert float(jnp.abs(leaf).max()) > 0, name
