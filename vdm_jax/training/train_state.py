"""The training state: step, parameters, optimiser state, EMA parameters and the adaptive
proposal's running averages.

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
