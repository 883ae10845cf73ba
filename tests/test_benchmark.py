"""experiments/benchmark.py on the tiny test config: every figure present and consistent."""

import common

benchmark = common.load_experiment('benchmark.py')


def test_benchmark_reports_rates_as_flops_over_time_and_matmul():
  config = common.load_config('test')
  result = benchmark.run_benchmark(config, batch=8, eval_batch=8, repeats=1,
                                   sample_num=2, sample_steps=2)
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
  for row in ('matmul 2048² f32', 'train step', 'eval pass', 'sampler', 'peak RSS'):
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
  assert benchmark.counting_config(config).model.attention_impl == 'batched'
  assert config.model.attention_impl == 'auto'  # the original is left alone
