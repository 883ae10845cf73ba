"""The training state: step, parameters, optimiser state and EMA parameters.

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
