r"""Throughput, FLOP/s and memory of the train step, the evaluation pass and the sampler.

All figures come from one process, with the machine's own matmul rate (jnp.dot of
two n×n matrices, median of several; float32 and n = 2048 unless --matmul_dtype and
--matmul_size say otherwise) measured in the same run as the practical peak. FLOPs are
XLA's cost analysis of the compiled computations; memory is XLA's memory analysis of
the compiled train step plus the process's peak RSS.

  python experiments/benchmark.py --config=configs/mnist.py
  # The paper's single-resolution network at n_embd 32, 4 blocks, 28x28x1, batch 32,
  # AdamW, continuous time, dropout 0.1 (BENCHMARKS.md, "the paper's network"):
  python experiments/benchmark.py --config=configs/mnist.py --config.model.n_embd=32 \
      --config.model.n_layer=4 --config.model.channel_mult='(1,)' \
      --config.model.groupnorm_groups=32 --config.model.p_drop=0.1 \
      --config.model.weighting=elbo --config.training.batch_size=32 \
      --config.training.steps_per_call=1 --eval_batch_size=32 --repeats=5 --skip_sampler
  python experiments/benchmark.py --config=configs/cifar10.py --batch_size=16 \
      --remat_compare --memory_only
  python experiments/benchmark.py --config=configs/cifar10.py --batch_size=4 \
      --eval_batch_size=4 --repeats=1 --sample_num=4 --sample_steps=2
  python experiments/benchmark.py --config=configs/cifar10.py --batch_size=128 \
      --config.model.dtype=bfloat16 --matmul_size=8192 --matmul_dtype=bfloat16  # GPU

Writes JSON (--out, default stdout after the table) and prints a readable table.
"""

import json
import os
import platform
import resource
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
from compiled_costs import build_run
from compiled_costs import count_eval_flops
from compiled_costs import count_sampler_flops
from compiled_costs import count_train_flops
from compiled_costs import image_shape
from compiled_costs import train_memory
from vdm_jax.evaluation import sampling
from vdm_jax.model import networks
from vdm_jax.runtime import host_memory
from vdm_jax.runtime import parallel
from vdm_jax.training import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
flags.DEFINE_integer('batch_size', None, 'Global train batch (default: the config\'s).')
flags.DEFINE_integer('eval_batch_size', None,
                     "Global eval batch (default: the config's eval.batch_size).")
flags.DEFINE_integer('repeats', 3, 'Timed dispatches of each computation (median).')
flags.DEFINE_integer('sample_num', 8, 'Samples drawn by the sampler benchmark.')
flags.DEFINE_integer('sample_steps', 20, 'T of the sampler benchmark.')
flags.DEFINE_bool('skip_sampler', False, 'Do not time the sampler.')
flags.DEFINE_bool('skip_eval', False, 'Do not time the evaluation pass.')
flags.DEFINE_bool('remat_compare', False,
                  'Also compile the train step with the other remat setting and report '
                  'both temporary-memory figures.')
flags.DEFINE_bool('memory_only', False,
                  'Only compile the train step and report its memory (no timing, no '
                  'matmul rate): quick for models that are slow on this machine.')
flags.DEFINE_integer('matmul_size', 2048,
                     'n of the n×n matmul whose rate is the peak (2048 on CPU; an '
                     'accelerator needs a larger n, e.g. 8192, to reach its rate).')
flags.DEFINE_enum('matmul_dtype', 'float32', ['float32', 'bfloat16'],
                  'dtype of that matmul (bfloat16 to compare a bfloat16 model with '
                  'the bfloat16 rate).')
flags.DEFINE_string('out', None, 'Write the JSON here.')
flags.DEFINE_bool('keep_freed_memory', True, 'Keep freed host memory in the process, as '
                  'vdm_jax.main does (vdm_jax/runtime/host_memory.py); false: glibc\'s defaults.')
flags.DEFINE_bool('ode', False, 'Also time the probability-flow ODE evaluator (config.ode).')
flags.DEFINE_integer('ode_batch', 8, 'Global batch of the ODE evaluator benchmark.')
flags.DEFINE_integer('ode_num_steps', 16,
                     'Equal solver steps of the ODE benchmark, so that its NFE does not '
                     'depend on the (untrained) network; 0 = the config\'s ode.num_steps.')

def timed(fn, repeats: int) -> float:
  """Median seconds of `fn()` (which must block), after one untimed warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def matmul_rate(n: int = 2048, dtype: str = 'float32', repeats: int = 10) -> float:
  """FLOP/s of jnp.dot of two n×n matrices of `dtype`: this machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  seconds = timed(lambda: dot(a, b).block_until_ready(), repeats)
  return 2.0 * n ** 3 / seconds


def _synthetic_batch(shape, batch, vocab, steps):
  rng = np.random.default_rng(0)
  return {'images': rng.integers(0, vocab, (steps, batch) + tuple(shape), dtype=np.uint8),
          'conditioning': np.zeros((steps, batch), np.float32)}


def _synthetic_eval_batch(mesh, shape, batch, vocab):
  """One global evaluation batch: random images, every one counted (mask true)."""
  local = _synthetic_batch(shape, batch, vocab, 1)
  return {'images': parallel.global_array(mesh, local['images'][0]),
          'conditioning': parallel.global_array(mesh, local['conditioning'][0]),
          'mask': parallel.global_array(mesh, np.ones((batch,), bool))}


def bench_train(config, mesh, shape, batch: int, repeats: int) -> dict:
  """images/s of the train call (steps_per_call steps per dispatch), FLOPs per step."""
  run = build_run(config, mesh, shape, batch)
  steps = config.training.steps_per_call
  call = train.make_train_call(run.model, run.tx, run.config, mesh)
  state = run.init_state()
  memory = train_memory(config, mesh, shape, batch)
  flops = count_train_flops(config, shape, batch)
  local = _synthetic_batch(shape, batch, config.model.vocab_size, steps)
  many = {k: parallel.global_array(mesh, v, leading_axes=1) for k, v in local.items()}
  holder = {'state': state}

  def run():
    holder['state'], metrics = call(holder['state'], many)
    jax.block_until_ready(metrics)

  seconds = timed(run, repeats)
  return dict(batch=batch, steps_per_call=steps, seconds_per_step=seconds / steps,
              images_per_s=batch * steps / seconds, flops_per_step=flops,
              flops_per_s=flops * steps / seconds, memory=memory)


def bench_eval(config, mesh, shape, batch: int, repeats: int) -> dict:
  """images/s of the evaluation step (one draw per image), FLOPs per batch."""
  from vdm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  run = build_run(config, mesh, shape, batch)
  model, params = run.model, run.init_state().params
  step = evaluate.make_eval_step(model, mesh, 1, None)
  data = _synthetic_eval_batch(mesh, shape, batch, config.model.vocab_size)
  key = jax.random.key(0)
  flops = count_eval_flops(config, shape, batch)
  seconds = timed(lambda: jax.block_until_ready(step(params, data, key)), repeats)
  return dict(batch=batch, images_per_s=batch / seconds, flops_per_batch=flops,
              flops_per_s=flops / seconds)


def bench_sampler(config, mesh, shape, num: int, timesteps: int) -> dict:
  """Seconds for `num` samples with T steps; FLOPs = T × one network evaluation."""
  run = build_run(config, mesh, shape, mesh.devices.size)
  model, params = run.model, run.init_state().params
  sampler = sampling.make_sampler(model, (num,) + tuple(shape), timesteps, mesh=mesh)
  key = jax.random.key(0)
  flops = count_sampler_flops(config, shape, num, timesteps)
  seconds = timed(lambda: jax.block_until_ready(sampler(params, key)), 1)
  return dict(num_samples=num, timesteps=timesteps, seconds=seconds,
              flops=flops, flops_per_s=flops / seconds)


def bench_ode(config, batch: int, repeats: int, num_steps: int = 16) -> dict:
  """images/s and NFE of one ODE evaluation step (vdm_jax/evaluation/ode.py) on initial params.

  evaluations_per_s (network passes × images per second) carries over to a trained
  model, whose adaptive solve needs its own NFE: images/s ≈ evaluations_per_s / NFE.
  """
  from vdm_jax.evaluation import ode  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if num_steps:
    config.ode.num_steps = num_steps
  mesh = parallel.make_mesh()
  shape = image_shape(config)
  run = build_run(config, mesh, shape, batch)
  model, params = run.model, run.init_state().params
  opts = ode.Options.from_config(config.ode)
  step = ode.make_eval_step(model, mesh, opts)
  data = _synthetic_eval_batch(mesh, shape, batch, config.model.vocab_size)
  out = {}

  def run():
    out['nll'], out['nfe'], _ = jax.block_until_ready(step(params, data, jax.random.key(0)))

  seconds = timed(run, repeats)
  nfe = float(out['nfe'])
  return dict(batch=batch, nfe=nfe, seconds_per_batch=seconds, images_per_s=batch / seconds,
              evaluations_per_s=nfe * batch / seconds, solver=opts.solver,
              num_steps=opts.num_steps, trace=opts.trace, num_probes=opts.probes_per_solve)


def run_benchmark(config, batch=None, eval_batch=None, repeats=3, sample_num=8,
                  sample_steps=20, skip_sampler=False, skip_eval=False,
                  remat_compare=False, memory_only=False, matmul_size=2048,
                  matmul_dtype='float32') -> dict:
  mesh = parallel.make_mesh()
  shape = image_shape(config)
  batch = batch or config.training.batch_size
  eval_batch = eval_batch or config.eval.batch_size
  peak = None if memory_only else matmul_rate(matmul_size, matmul_dtype)
  result = dict(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   backend=jax.default_backend(),
                   devices=[str(d.device_kind) for d in jax.devices()],
                   device_count=jax.device_count(), python=sys.version.split()[0],
                   jax=jax.__version__),
      config=dict(dataset=config.data.dataset, image_shape=list(shape),
                  n_embd=config.model.n_embd, n_layer=config.model.n_layer,
                  dtype=config.model.dtype, remat=config.model.remat,
                  attention_impl=networks.resolve_attention_impl(
                      config.model.attention_impl)),
      matmul=dict(size=matmul_size, dtype=matmul_dtype), matmul_flops_per_s=peak)
  if memory_only:
    result['train'] = dict(batch=batch, memory=train_memory(config, mesh, shape, batch))
    skip_eval = skip_sampler = True
  else:
    result['train'] = bench_train(config, mesh, shape, batch, repeats)
    result['train']['fraction_of_matmul'] = result['train']['flops_per_s'] / peak
  if not skip_eval:
    result['eval'] = bench_eval(config, mesh, shape, eval_batch, repeats)
    result['eval']['fraction_of_matmul'] = result['eval']['flops_per_s'] / peak
  if not skip_sampler:
    result['sampler'] = bench_sampler(config, mesh, shape, sample_num, sample_steps)
    result['sampler']['fraction_of_matmul'] = result['sampler']['flops_per_s'] / peak
  if remat_compare:
    other = config.copy_and_resolve_references()
    other.model.remat = not config.model.remat
    result['remat_compare'] = {
        f'remat={config.model.remat}': result['train']['memory'].get('temp_size_in_bytes'),
        f'remat={other.model.remat}': train_memory(other, mesh, shape, batch).get(
            'temp_size_in_bytes')}
  result['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return result


def table(result: dict) -> str:
  g = 1e9
  rows = []
  t = result['train']
  if result['matmul_flops_per_s'] is not None:
    m = result['matmul']
    rows.append((f"matmul {m['size']}² {m['dtype']}",
                 f"{result['matmul_flops_per_s'] / g:.1f} GFLOP/s",
                 '', ''))
  if 'images_per_s' in t:
    rows.append(('train step', f"{t['images_per_s']:.1f} img/s "
                 f"({t['seconds_per_step'] * 1e3:.0f} ms/step, batch {t['batch']}, "
                 f"{t['steps_per_call']}/call)", f"{t['flops_per_s'] / g:.1f} GFLOP/s",
                 f"{100 * t['fraction_of_matmul']:.0f}%"))
  if 'eval' in result:
    e = result['eval']
    rows.append(('eval pass', f"{e['images_per_s']:.1f} img/s (batch {e['batch']})",
                 f"{e['flops_per_s'] / g:.1f} GFLOP/s", f"{100 * e['fraction_of_matmul']:.0f}%"))
  if 'sampler' in result:
    s = result['sampler']
    rows.append(('sampler', f"{s['seconds']:.2f} s for {s['num_samples']} samples × "
                 f"T={s['timesteps']}", f"{s['flops_per_s'] / g:.1f} GFLOP/s",
                 f"{100 * s['fraction_of_matmul']:.0f}%"))
  mem = t['memory']
  if mem:
    rows.append((f"train step memory (batch {t['batch']})",
                 f"temp {mem.get('temp_size_in_bytes', 0) / 2**20:.1f} MiB,"
                 f" args {mem.get('argument_size_in_bytes', 0) / 2**20:.1f} MiB", '', ''))
  if 'remat_compare' in result:
    rows.append(('remat temp memory', ', '.join(
        f'{k}: {v / 2**20:.1f} MiB' for k, v in result['remat_compare'].items()), '', ''))
  rows.append(('peak RSS', f"{result['peak_rss_bytes'] / 2**30:.2f} GiB", '', ''))
  width = [max(len(r[i]) for r in rows) for i in range(4)]
  lines = [' | '.join(c.ljust(w) for c, w in zip(r, width)) for r in rows]
  header = (f"{result['config']['dataset']} n_embd={result['config']['n_embd']} "
            f"n_layer={result['config']['n_layer']} dtype={result['config']['dtype']} "
            f"attention={result['config']['attention_impl']} on {result['machine']['backend']} "
            f"({result['machine']['device_count']} device(s))")
  return header + '\n' + '\n'.join(lines)


def main(argv):
  del argv
  if FLAGS.keep_freed_memory:
    host_memory.keep_freed_memory()
  result = run_benchmark(
      FLAGS.config, FLAGS.batch_size, FLAGS.eval_batch_size, FLAGS.repeats,
      FLAGS.sample_num, FLAGS.sample_steps, FLAGS.skip_sampler, FLAGS.skip_eval,
      FLAGS.remat_compare, FLAGS.memory_only, FLAGS.matmul_size, FLAGS.matmul_dtype)
  print(table(result))
  text = json.dumps(result, indent=2)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      f.write(text)
  else:
    print(text)
  if FLAGS.ode:
    r = bench_ode(FLAGS.config, FLAGS.ode_batch, FLAGS.repeats, FLAGS.ode_num_steps)
    print(f"ODE evaluator: {r['images_per_s']:.2f} img/s (batch {r['batch']}, NFE "
          f"{r['nfe']:.0f}, {r['solver']}, trace {r['trace']}), "
          f"{r['evaluations_per_s']:.0f} image-evaluations/s")
    print(json.dumps({'ode': r}, indent=2))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
