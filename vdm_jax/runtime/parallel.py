"""Data parallelism over every device of every host with jax.sharding.

One Mesh with a single 'data' axis over `jax.devices()` (all hosts). Batches are
sharded along 'data'; parameters, optimiser state and EMA are replicated. XLA
inserts the gradient all-reduce. This is what pmap did, in the form JAX recommends.
"""

from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Starts multi-host JAX when there is more than one process.

  On TPU pods and under SLURM `jax.distributed.initialize()` finds everything by
  itself; elsewhere pass the coordinator's host:port, the number of processes and
  this process's id (flags of the same names in `main.py`).
  """
  explicit = coordinator_address is not None or num_processes is not None
  if explicit:
    if coordinator_address is None or num_processes is None or process_id is None:
      raise ValueError('--coordinator_address, --num_processes and --process_id must be '
                       'given together (or none of them, on TPU pods and SLURM).')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    try:
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # one process, nothing to find
      logging.info('Single process (jax.distributed found no cluster: %s).', e)
      return
  logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices=None) -> Mesh:
  """A 1-D Mesh over all devices of all hosts, axis 'data'."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Shards the batch axis, after `leading_axes` unsharded axes (e.g. steps per call)."""
  return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def global_array(mesh: Mesh, local: np.ndarray, leading_axes: int = 0) -> jax.Array:
  """This process's rows of a batch → one global array sharded on 'data'."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, leading_axes), local)


def to_host(tree):
  """Global arrays (replicated or sharded over hosts) as numpy on every host."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)
