"""TrainState, optimizers from config, EMA, and the non-finite guard shared by every objective."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(optim, num_steps: int):
  """Linear warmup to `optim.lr`, then cosine / linear decay to lr * final_lr_fraction, or constant."""
  warmup = min(optim.warmup_steps, max(num_steps - 1, 0))
  decay_steps = max(num_steps - warmup, 1)
  end = optim.lr * optim.final_lr_fraction
  if optim.schedule == "constant":
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == "cosine":
    after = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.final_lr_fraction)
  elif optim.schedule == "linear":
    after = optax.linear_schedule(optim.lr, end, decay_steps)
  else:
    raise ValueError(f"config.optim.schedule: unknown {optim.schedule!r}")
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def make_optimizer(optim, num_steps: int) -> optax.GradientTransformation:
  lr = learning_rate_schedule(optim, num_steps)
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  if optim.name == "adam":
    parts.append(optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps))
  elif optim.name == "adamw":
    parts.append(optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                             weight_decay=optim.weight_decay))
  else:
    raise ValueError(f"config.optim.name: unknown optimizer {optim.name!r}; use adam or adamw")
  return optax.chain(*parts)


def create(params, optimizer) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=optimizer.init(params))


def apply_gradients(state: TrainState, grads, optimizer, ema_decay: float) -> TrainState:
  """One optimizer step, then EMA: ema <- decay * ema + (1 - decay) * params."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def keep_if_finite(new_state, old_state, loss):
  """`new_state` if `loss` is finite, else `old_state` (with the step count still advanced, so the
  data and RNG stay aligned with an unbroken run). A NaN never reaches the params or a checkpoint."""
  finite = jnp.isfinite(loss)
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
  return kept, jnp.logical_not(finite).astype(jnp.int32)


def global_norm(tree):
  return optax.global_norm(tree)
