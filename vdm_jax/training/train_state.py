"""The training state: step, parameters, optimiser state, EMA parameters, the adaptive
proposal's running averages and the power-function EMA profiles.

The data position is the step: batch k is a function of (seed, k) alone
(vdm_jax/data/input_pipeline.py), so restoring the step restores the data order.
"""

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimiser steps taken (= batches consumed)
  params: Any  # the model's parameters
  opt_state: Any  # optax state
  ema_params: Any  # exponential moving average of params (evaluated and sampled)
  # time_sampling.AdaptiveState: the running loss per γ bin of model.time_sampling =
  # 'adaptive' (docs/maths.md §11.5); present, and checkpointed, in every run.
  time_sampler: Any = None
  # The power-function EMA profiles of config.phema.sigma_rels, every leaf stacked
  # [K, ...] (docs/maths.md §14, vdm_jax/training/phema.py); None when there are none.
  phema: Any = None
