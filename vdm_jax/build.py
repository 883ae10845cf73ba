"""One place that builds a run from its config: data facts, model, optimiser, state, mesh.

Training, evaluation, sampling, the codec, the ODE evaluator, checkpoint import and the
benchmark all start from `build(config)`, so a run is described by its config alone.
"""

import dataclasses
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from vdm_jax.data import datasets
from vdm_jax.model import time_sampling
from vdm_jax.model import vdm
from vdm_jax.runtime import checkpoints
from vdm_jax.runtime import parallel
from vdm_jax.runtime import workdir as workdir_lib
from vdm_jax.training import optim
from vdm_jax.training import phema
from vdm_jax.training import train_state
from vdm_jax import validation


def rng_streams(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init key, training key): training step k uses fold_in(training key, k)."""
  root = jax.random.key(seed)
  return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a config determines before any array is computed."""
  config: object  # the locked, validated ConfigDict
  mesh: Mesh  # every device of every host, axis 'data'
  info: datasets.DatasetInfo  # the data's shape, V and split sizes
  model: vdm.VDM
  tx: optax.GradientTransformation

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.info.height, self.info.width, self.info.channels)

  @property
  def replicated(self):
    return parallel.replicated(self.mesh)

  def _init_fn(self):
    def init(key):
      k_params, k_sample, k_dropout = jax.random.split(key, 3)
      x = jnp.zeros((1,) + self.image_shape, jnp.uint8)
      params = self.model.init({'params': k_params, 'sample': k_sample,
                                'dropout': k_dropout}, x, jnp.zeros((1,)))['params']
      num_profiles = len(self.config.phema.sigma_rels)
      return train_state.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
          ema_params=params,
          time_sampler=time_sampling.init_adaptive(self.config.model.adaptive_bins),
          phema=phema.init(params, num_profiles) if num_profiles else None)
    return init

  def init_state(self) -> train_state.TrainState:
    """The initial state, computed by a jitted init directly replicated on the mesh."""
    init_key, _ = rng_streams(self.config.seed)
    return jax.jit(self._init_fn(), out_shardings=self.replicated)(init_key)

  def abstract_state(self) -> train_state.TrainState:
    """ShapeDtypeStructs with shardings of the state (orbax's restore target)."""
    init_key, _ = rng_streams(self.config.seed)
    return checkpoints.abstract_like(jax.eval_shape(self._init_fn(), init_key),
                                     self.replicated)

  def eval_params(self, state: train_state.TrainState):
    """The parameters evaluated and sampled: the EMA unless config.eval.use_ema is off
    (restore() puts the post-hoc EMA of eval.phema_sigma_rel in its place)."""
    return state.ema_params if self.config.eval.use_ema else state.params

  @property
  def params_name(self) -> str:
    """What eval_params are, as result files name them: ema | raw | phema_sigma_rel=σ."""
    ev = self.config.eval
    if not ev.use_ema:
      return 'raw'
    return 'ema' if ev.phema_sigma_rel is None else f'phema_sigma_rel={ev.phema_sigma_rel:g}'


def build(config, mesh: Optional[Mesh] = None, image_shape: Optional[tuple] = None) -> Run:
  """Validates `config` (against the data, unless image_shape is given) and builds the run."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  info = validation.validate(config, mesh=mesh, image_shape=image_shape)
  return Run(config=config, mesh=mesh, info=info, model=vdm.VDM.from_config(config.model),
             tx=optim.make_optimizer(config.optimizer, config.training.num_steps))


def restore(config, workdir, mesh: Optional[Mesh] = None
            ) -> tuple[Run, train_state.TrainState]:
  """(run, state) of the newest checkpoint in `workdir`, for evaluation and sampling.

  Fields that only change training (dropout, weighting, …) may differ from the saved
  config; model-defining ones may not. Raises WorkdirError when there is no checkpoint.
  With config.eval.phema_sigma_rel, the state's EMA is that post-hoc EMA, reconstructed
  from the workdir's snapshots (docs/maths.md §14).
  """
  wd = workdir if isinstance(workdir, workdir_lib.Workdir) else workdir_lib.Workdir(workdir)
  wd.require()
  run = build(config, mesh)
  saved = wd.read_config()
  if saved is not None:
    validation.check_resumed_config(saved, config, hint='')
  manager = checkpoints.make_manager(wd, keep=config.training.keep_checkpoints)
  try:
    state = checkpoints.restore_latest(manager, run.abstract_state(), set_aside=False)
  finally:
    manager.close()
  if state is None:
    raise workdir_lib.WorkdirError(
        f'No checkpoint in {wd.checkpoint_dir}: train first (--mode=train) or import one '
        '(--mode=import_original).')
  sigma_rel = config.eval.phema_sigma_rel
  if sigma_rel is not None:
    abstract = run.abstract_state().params
    (params,), info = phema.from_workdir(wd, abstract, [sigma_rel], int(state.step))
    logging.info('Post-hoc EMA of sigma_rel %g at step %d from %d snapshots (fit error %.2g).',
                 sigma_rel, info['phema_step'], info['phema_snapshots'],
                 info['phema_fit_error'][0])
    state = state.replace(ema_params=params)
  return run, state
