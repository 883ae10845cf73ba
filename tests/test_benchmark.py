"""experiments/benchmark.py and compiled_costs.py on the tiny test config: every figure
present and consistent."""

import jax
import pytest

import common

pytestmark = pytest.mark.slow  # each test compiles and times whole models

benchmark = common.load_experiment('benchmark.py')
costs = common.load_experiment('compiled_costs.py')


def test_benchmark_reports_rates_as_flops_over_time_and_matmul():
  config = common.load_config('test')
  result = benchmark.run_benchmark(config, batch=8, eval_batch=8, repeats=1,
                                   sample_num=2, sample_steps=2, matmul_size=512)
  peak = result['matmul_flops_per_s']
  assert peak > 1e9  # any machine that runs JAX does more than 1 GFLOP/s
  for part in ('train', 'eval', 'sampler'):
    r = result[part]
    assert r['flops_per_s'] > 0
    assert abs(r['fraction_of_matmul'] - r['flops_per_s'] / peak) < 1e-12
  t = result['train']
  steps = config.training.steps_per_call
  assert abs(t['flops_per_s'] - t['flops_per_step'] * t['images_per_s'] / 8) < 1e-6 * t[
      'flops_per_s']
  assert t['steps_per_call'] == steps and t['memory']['temp_size_in_bytes'] > 0
  assert result['sampler']['timesteps'] == 2
  text = benchmark.table(result)
  for row in ('matmul 512² float32', 'train step', 'eval pass', 'sampler', 'peak RSS'):
    assert row in text


def test_memory_only_compares_remat_without_timing():
  result = benchmark.run_benchmark(common.load_config('test'), batch=8,
                                   remat_compare=True, memory_only=True)
  assert result['matmul_flops_per_s'] is None and 'eval' not in result
  temps = result['remat_compare']
  assert set(temps) == {'remat=False', 'remat=True'}
  assert temps['remat=False'] == result['train']['memory']['temp_size_in_bytes']
  assert 'remat temp memory' in benchmark.table(result)


def test_flops_are_counted_with_the_attention_unchunked():
  """XLA counts a loop body once; the count must not depend on the attention's form."""
  config = common.load_config('test')
  assert costs.counting_config(config).model.attention_impl == 'batched'
  assert config.model.attention_impl == 'auto'  # the original is left alone


def test_flops_count_every_convolution_and_little_else():
  """The count must hold each 3×3 convolution (GPU's compiled count drops them).

  Every (3, 3, C_in, C_out) kernel is applied once per pixel in the forward pass
  (no downsampling, §6). XLA counts only the taps that fall inside the image, (3H − 2)
  per row of H pixels, so 2·(3H − 2)(3W − 2)·C_in·C_out FLOPs per image; the train
  step adds the input and kernel gradients, twice that again.
  """
  config = common.load_config('test')
  config.model.n_embd = 32  # convolution-dominated, as the real models are
  shape = costs.image_shape(config)
  batch = 8
  params = costs.build_run(config, costs.counting_mesh(), shape,
                               batch).abstract_state().params
  kernels = [p.shape for p in jax.tree_util.tree_leaves(params)
             if len(p.shape) == 4 and p.shape[:2] == (3, 3)]
  assert len(kernels) >= 4
  h, w, _ = shape
  conv_forward = sum(2 * (3 * h - 2) * (3 * w - 2) * cin * cout for _, _, cin, cout in kernels) * batch
  eval_flops = costs.count_eval_flops(config, shape, batch)
  train_flops = costs.count_train_flops(config, shape, batch)
  assert conv_forward < eval_flops < 1.5 * conv_forward
  assert 3 * conv_forward < train_flops < 1.5 * 3 * conv_forward
  # Against XLA's count of the CPU-compiled step: lower only by duplicated elementwise work.
  compiled = costs.lower_train_step(costs.counting_config(config),
                                        costs.counting_mesh(), shape, batch).compile()
  compiled_flops = costs.flops_of(compiled)
  assert 0.9 * compiled_flops < train_flops <= compiled_flops
