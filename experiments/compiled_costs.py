"""FLOPs and memory of the compiled train step, evaluation step and sampler step.

Nothing here runs a computation: FLOPs are XLA's cost analysis of the computations
lowered for one CPU device (counting_mesh says why), memory is XLA's memory analysis of
the compiled train step. experiments/benchmark.py reports them beside its timings.
"""

import jax
import jax.numpy as jnp

from vdm_jax import build
from vdm_jax.data import datasets
from vdm_jax.runtime import parallel
from vdm_jax.training import train


def image_shape(config):
  """The data's [H, W, C], without reading the data where the registry knows it."""
  shape = datasets.get(config.data.dataset).shape
  if shape is None:
    info = datasets.dataset_info(config.data)
    shape = (info.height, info.width, info.channels)
  return tuple(shape)


def build_run(config, mesh, shape, batch: int):
  """The run of `config` at global batch `batch` on synthetic data of `shape`."""
  config = config.copy_and_resolve_references()
  config.training.batch_size = config.eval.batch_size = batch
  return build.build(config, mesh, image_shape=shape)


def flops_of(lowered) -> float:
  """XLA's FLOP count of a lowered or compiled computation (see counting_mesh)."""
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan'))) if cost else float('nan')


def counting_mesh():
  """One CPU device: where FLOPs are counted, whatever the benchmark runs on.

  XLA's cost analysis after GPU compilation counts every convolution and matmul,
  which became cuDNN/cuBLAS custom calls, as zero FLOPs (an H200 with jax 0.11.2:
  2.8 of 155 GFLOP per cifar10 training image), and the unoptimised module's analysis
  gave no count there at all. The arithmetic does not depend on the backend, so the
  count comes from the computation lowered, not compiled, for the CPU. It is below
  the compiled CPU count only by the elementwise work that XLA's fusions duplicate
  (mnist train step: 0.4 % below; the tiny test model: 8 %).
  """
  return parallel.make_mesh(jax.devices('cpu')[:1])


def counting_config(config):
  """config with the attention unchunked, for counting FLOPs.

  XLA's cost analysis counts a loop's body once, so the chunked attention (a
  lax.map over images) would be undercounted; the batched form computes the same
  function with the same arithmetic.
  """
  counting = config.copy_and_resolve_references()
  counting.model.attention_impl = 'batched'
  return counting


def memory_of(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  return {k: int(getattr(m, k)) for k in (
      'temp_size_in_bytes', 'argument_size_in_bytes', 'output_size_in_bytes',
      'alias_size_in_bytes', 'generated_code_size_in_bytes') if hasattr(m, k)}


def lower_train_step(config, mesh, shape, batch: int):
  """The train call lowered for one step (nothing is compiled or run)."""
  run = build_run(config, mesh, shape, batch)
  call = train.make_train_call(run.model, run.tx, run.config, mesh)
  state = run.abstract_state()
  spec = jax.ShapeDtypeStruct((1, batch) + tuple(shape), jnp.uint8,
                              sharding=parallel.batch_sharding(mesh, 1))
  cond = jax.ShapeDtypeStruct((1, batch), jnp.float32,
                              sharding=parallel.batch_sharding(mesh, 1))
  return call.lower(state, {'images': spec, 'conditioning': cond})


def count_train_flops(config, shape, batch: int) -> float:
  """FLOPs of one train step (a scan counts its body once, so a call of 1 step)."""
  return flops_of(lower_train_step(counting_config(config), counting_mesh(), shape, batch))


def count_eval_flops(config, shape, batch: int) -> float:
  """FLOPs of one evaluation step (one draw per image)."""
  from vdm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  cmesh, model, params = _counting_model(config, shape)
  step = evaluate.make_eval_step(model, cmesh, 1, None)

  def spec(s, dtype):
    return jax.ShapeDtypeStruct(s, dtype, sharding=parallel.batch_sharding(cmesh))

  data = {'images': spec((batch,) + tuple(shape), jnp.uint8),
          'conditioning': spec((batch,), jnp.float32), 'mask': spec((batch,), jnp.bool_)}
  return flops_of(step.lower(params, data, _abstract_key(cmesh)))


def count_sampler_flops(config, shape, num: int, timesteps: int) -> float:
  """FLOPs of T sampler steps for `num` images: T × one step's."""
  cmesh, model, params = _counting_model(config, shape)
  step_fn = jax.jit(lambda p, z, key: model.apply(
      {'params': p}, 0, timesteps, z, jnp.zeros((num,)), key,
      method=type(model).sample_step))
  z = jax.ShapeDtypeStruct((num,) + tuple(shape), jnp.float32,
                           sharding=parallel.replicated(cmesh))
  return flops_of(step_fn.lower(params, z, _abstract_key(cmesh))) * timesteps


def _counting_model(config, shape):
  """(counting mesh, model, abstract parameters on it) for counting_config(config)."""
  cmesh = counting_mesh()
  config = counting_config(config)
  run = build_run(config, cmesh, shape, 1)
  return cmesh, run.model, run.abstract_state().params


def _abstract_key(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=parallel.replicated(mesh))


def train_memory(config, mesh, shape, batch: int) -> dict:
  """XLA's memory analysis of one compiled train step (nothing is run)."""
  return memory_of(lower_train_step(config, mesh, shape, batch).compile())
