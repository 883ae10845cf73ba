"""AdamW with warm-up, optional decay and clipping, the weight-decay mask, and EMA (§8)."""

import functools

import flax
import jax
import jax.numpy as jnp
import optax

DECAYS = ('constant', 'cosine')


def learning_rate_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then constant or cosine to 0."""
  warmup = optax.linear_schedule(0.0, opt_config.learning_rate,
                                 max(opt_config.warmup_steps, 1))
  if opt_config.decay == 'constant':
    after = optax.constant_schedule(opt_config.learning_rate)
  elif opt_config.decay == 'cosine':
    after = optax.cosine_decay_schedule(
        opt_config.learning_rate, max(num_steps - opt_config.warmup_steps, 1))
  else:
    raise ValueError(f'optimizer.decay must be one of {DECAYS}, got {opt_config.decay!r}.')
  return optax.join_schedules([warmup, after], [opt_config.warmup_steps])


WEIGHT_DECAY_MASKS = ('all_but_biases', 'kernels')


def weight_decay_mask(params, kind: str = 'all_but_biases'):
  """True where AdamW decays the parameter (§8).

  all_but_biases: the original code's mask, every parameter not named `bias`
    (GroupNorm scales, the schedule's `w`, `b`, γ_0, γ_1 and its kernels included).
  kernels: only the network's kernels; the norm scales, biases and the whole
    schedule are left undecayed.
  """
  flat = flax.traverse_util.flatten_dict(params)
  if kind == 'all_but_biases':
    mask = {path: path[-1] != 'bias' for path in flat}
  elif kind == 'kernels':
    mask = {path: path[-1] == 'kernel' and path[0] != 'gamma' for path in flat}
  else:
    raise ValueError(f'optimizer.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, '
                     f'got {kind!r}.')
  return flax.traverse_util.unflatten_dict(mask)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """optax AdamW with the original's settings as defaults (docs/maths.md §8)."""
  adamw = optax.adamw(
      learning_rate=learning_rate_schedule(opt_config, num_steps), b1=opt_config.b1,
      b2=opt_config.b2, eps=opt_config.eps, weight_decay=opt_config.weight_decay,
      mask=functools.partial(weight_decay_mask, kind=opt_config.weight_decay_mask))
  if opt_config.schedule_lr_scale != 1.0:  # the schedule's steps, scaled after Adam
    adamw = optax.chain(adamw, optax.masked(optax.scale(opt_config.schedule_lr_scale),
                                            schedule_mask))
  if opt_config.grad_clip is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(opt_config.grad_clip), adamw)


def schedule_mask(params):
  """True for the noise schedule's parameters (module `gamma`) and, for the mulan
  schedule, its latent's encoder (`latent_encoder`, docs/maths.md §13.2)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: path[0] in ('gamma', 'latent_encoder') for path in flat})


def ema_rate(opt_config, step: jax.Array) -> jax.Array:
  """rate_k = min(rate, (1 + k)/(10 + k)) with warm-up, else the constant rate (§8)."""
  rate = jnp.asarray(opt_config.ema_rate, jnp.float32)
  if not opt_config.ema_warmup:
    return rate
  k = step.astype(jnp.float32)
  return jnp.minimum(rate, (1.0 + k) / (10.0 + k))


def ema_update(ema_params, params, rate: jax.Array):
  return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)
