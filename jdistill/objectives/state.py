"""What every objective shares: the Objective contract, the TrainState, optimizers from config,
the one optimizer update (lr -> direction -> EMA) and the non-finite guard that ends each step."""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Optional, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jdistill.errors import check_choice

OPTIMIZERS = ("adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")


class Objective(Protocol):
  """A distillation method's math, as pure functions the one loop compiles (train/loop.py).

    init_state(rng) -> state            any pytree (params may be nn.Partitioned-boxed)
    train_step(state, batch, rng, frozen, stage[, phase]) -> (state, metrics)   pure
    eval_params(state, frozen) -> params   what sampling uses (EMA, merged LoRA, the generator)
    phase_of(step) -> None | hashable    a static program choice for loop step `step`; each
                                         distinct phase compiles once (None: one program)

  `frozen` (what a step reads but never trains: teachers, cached weights) and `stage` (small
  traced values: a new stage is new data, not a new program) are declared pytrees, or None.
  """

  def init_state(self, rng) -> Any: ...

  def train_step(self, state, batch, rng, frozen, stage) -> tuple: ...

  def eval_params(self, state, frozen=None) -> Any: ...

  def phase_of(self, step: int) -> Optional[Hashable]:
    del step
    return None


@dataclasses.dataclass(frozen=True)
class OneNetworkObjective(Objective):
  """The fields every objective that trains one network with one optimizer starts with."""
  denoiser: Any
  schedule: Any
  optimizer: Any
  optim: Any                      # config.optim (lr schedule, EMA decay and warmup)
  num_steps: int                  # train steps of the run (the lr schedule)
  data_shape: tuple


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  curriculum: Any = None        # a CurriculumState when an adaptive timestep sampler is on


def learning_rate(optim, step, total_steps):
  """Linear warmup to `optim.lr`, then cosine / linear decay to lr * final_lr_fraction, or constant.

  Pure jnp of (step, total_steps), both may be traced: a new stage length is new data, not a new
  program.
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.minimum(float(optim.warmup_steps), total - 1.0)
  warm = jnp.where(warmup > 0, jnp.minimum(step / jnp.maximum(warmup, 1.0), 1.0), 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  end = optim.final_lr_fraction
  check_choice("optim.schedule", optim.schedule, LR_SCHEDULES)
  if optim.schedule == "constant":
    decay = 1.0
  elif optim.schedule == "cosine":
    decay = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  else:
    decay = 1.0 + (end - 1.0) * progress
  return optim.lr * warm * decay


def make_optimizer(optim) -> optax.GradientTransformation:
  """The update direction (clipping, Adam moments, decoupled weight decay); `apply_gradients`
  scales it by -learning_rate(step, total)."""
  parts = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
  check_choice("optim.name", optim.name, OPTIMIZERS)
  parts.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
  if optim.name == "adamw" and optim.weight_decay > 0:
    parts.append(optax.add_decayed_weights(optim.weight_decay))
  direction = optax.chain(*parts)
  if optim.get("accumulate_steps", 1) > 1:     # gradient accumulation: one update per k micro-batches
    return optax.MultiSteps(direction, every_k_schedule=optim.accumulate_steps)
  return direction


def create(params, optimizer, ema: bool = True) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params if ema else None, opt_state=optimizer.init(params))


def apply_gradients(state: TrainState, grads, optimizer, ema_decay, lr, ema_warmup=False) -> TrainState:
  """params <- params - lr * direction, then EMA: ema <- decay * ema + (1 - decay) * params.
  With `ema_warmup` the decay after n updates is min(decay, (1 + n) / (10 + n)): the EMA averages
  about the last n / 9 updates until it reaches `decay`, so it neither lags early nor forgets late."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, updates)
  if state.ema_params is None:                  # a network kept without EMA (a critic)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if ema_warmup:                                # n: real updates so far, not micro-steps
    n = (state.opt_state.gradient_step if isinstance(optimizer, optax.MultiSteps)
         else state.step).astype(jnp.float32)
    ema_decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
  if isinstance(optimizer, optax.MultiSteps):   # the EMA moves only when the params do
    ema_decay = jnp.where(optimizer.has_updated(opt_state), ema_decay, 1.0)
  ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)


def trainable(lora, params, rng=None):
  """What trains, starting from `params`: the params themselves, or (a LoRA) fresh adapters over
  them, which stay frozen as the adapters' base."""
  if lora is None:
    return params
  return lora.init(jax.random.key(0) if rng is None else rng, nn.unbox(params))


def full_params(lora, trainable_params, base):
  """The network's params: the trainable params, or the LoRA adapters merged into `base`."""
  return trainable_params if lora is None else lora.merge(base, trainable_params)


def optimizer_update(state: TrainState, grads, optimizer, optim, total_steps, step=None):
  """The one update every train_step ends in: lr(step, total) from `optim` (config.optim; `step`
  defaults to the state's own), the optimizer's direction, EMA (`optim.ema_decay`,
  `optim.ema_warmup`; none for a state kept without EMA). Returns (new state, {'grad_norm', 'lr'});
  the step then ends in `keep_if_finite`."""
  lr = learning_rate(optim, state.step if step is None else step, total_steps)
  new_state = apply_gradients(state, grads, optimizer, optim.ema_decay, lr, optim.ema_warmup)
  return new_state, {"grad_norm": global_norm(grads), "lr": lr}


def descend(state: TrainState, loss_fn, args, optimizer, optim, total_steps, checked=()):
  """One gradient step of one network: (loss, aux) = loss_fn(state.params, *args), its gradient,
  the one update (`optimizer_update`) and the guard (`keep_if_finite` over the gradient norm, the
  new params and the `checked` keys of aux). Returns (state, {loss, **aux, grad_norm, lr, guard})."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *args)
  new_state, metrics = optimizer_update(state, grads, optimizer, optim, total_steps)
  new_state, guard = keep_if_finite(new_state, state, loss, (metrics["grad_norm"], new_state.params,
                                                             *(aux[key] for key in checked)))
  return new_state, {"loss": loss, **aux, **metrics, **guard}


def keep_if_finite(new_state, old_state, loss, update=()):
  """`new_state` if `loss` and `update` are finite, else `old_state` (with the step count still
  advanced, so the data and RNG stay aligned with an unbroken run): a NaN or Inf never reaches the
  params or a checkpoint. `update` holds what the step wrote and how: the new params (the EMA and
  Adam's moments are made from them and the gradients) and the gradient norms; it is checked by
  one fused reduction, its global norm (a per-leaf check makes XLA's compile time explode).
  Returns (state, flags): `nonfinite` (the step was skipped) and `nonfinite_update` (skipped with
  a finite loss: the gradients or the optimizer's arithmetic went non-finite)."""
  loss_finite = jnp.isfinite(loss)
  update_finite = jnp.isfinite(global_norm(update))
  finite = loss_finite & update_finite
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
  if hasattr(kept, "step"):
    kept = kept.replace(step=new_state.step)
  return kept, {"nonfinite": jnp.logical_not(finite).astype(jnp.int32),
                "nonfinite_update": (loss_finite & ~update_finite).astype(jnp.int32)}


def global_norm(tree):
  return optax.tree.norm(tree)
