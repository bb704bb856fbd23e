"""Multi-teacher distillation from cached predictions: one student regresses the weighted average of
K teachers (e.g. fine-tunes of one base model), read from caches built beforehand
(`python -m jdistill.cache`, jdistill/data/cache.py), so no teacher is in memory while it trains.

A cached example holds (x, t, eps) and every teacher's v_k on z_t = alpha_t x + sigma_t eps; the
teacher's x prediction is x_k = alpha_t z_t - sigma_t v_k. With weights w_k >= 0, sum_k w_k = 1:

    x_target = sum_k w_k x_k,      loss = E[ lambda(logsnr_t) d(x_hat(z_t), x_target) ]

d: squared error ('mse') or the Huber loss of the weighted error ('huber'); lambda from
diffusion/losses.py (v_mse by default). Per-teacher losses E[lambda d(x_hat, x_k)] are logged too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.losses import weighted_x_loss
from jdistill.diffusion.parameterization import forward_process, from_model_output
from jdistill.errors import ConfigError
from jdistill.objectives import state as state_lib


def teacher_weights(teachers):
  """(ids, sorted; weights w_k normalised to sum 1) from config.multi_teacher.teachers."""
  ids = tuple(sorted(teachers))
  raw = np.array([float(teachers[i]["weight"]) for i in ids])
  for teacher_id, weight in zip(ids, raw):
    if not weight >= 0:
      raise ConfigError(f"config.multi_teacher.teachers.{teacher_id}.weight: must be >= 0, got {weight}")
  if not ids or raw.sum() <= 0:
    raise ConfigError("config.multi_teacher.teachers: all weights are 0; at least one must be > 0")
  return ids, raw / raw.sum()


@flax.struct.dataclass
class MultiTeacherFrozen:
  weights: Any                    # w_k, (K,) float32, in the order of `teacher_ids`
  base: Any = None                # LoRA: the frozen weights the adapters sit on (the student's init)


@dataclasses.dataclass(frozen=True)
class MultiTeacherObjective(state_lib.OneNetworkObjective):
  teacher_ids: tuple              # the order of batch['teacher_v'][:, k] and frozen.weights[k]
  weighting: str = "v_mse"
  min_snr_gamma: float = 5.0
  huber_delta: Optional[float] = None   # None: mse
  lora: Any = None                # a LoRA: only adapters train, over frozen.base

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def new_state(self, params, rng=None):
    return state_lib.create(state_lib.trainable(self.lora, params, rng), self.optimizer)

  def targets(self, batch, weights):
    """(z_t, logsnr_t, x_k of every teacher (B, K, ...), x_target = sum_k w_k x_k) of a cached batch."""
    x, eps = batch["x"].astype(jnp.float32), batch["eps"].astype(jnp.float32)
    z_t, logsnr = forward_process(x, batch["t"], eps, self.schedule)
    to_x = lambda v: from_model_output("v", v, z_t, logsnr, self.denoiser.path).x0
    teacher_x = jax.vmap(to_x, in_axes=1, out_axes=1)(
        batch["teacher_v"].astype(jnp.float32))
    return z_t, logsnr, teacher_x, jnp.einsum("k,bk...->b...", weights, teacher_x)

  def distance(self, x_hat, x_target, logsnr):
    """Per example lambda(logsnr) d(x_hat, x_target)."""
    return weighted_x_loss(x_hat, x_target, logsnr, self.weighting, self.min_snr_gamma,
                           self.huber_delta)

  def train_step(self, state, batch, rng, frozen, stage):
    del stage
    z_t, logsnr, teacher_x, x_target = self.targets(batch, frozen.weights)
    label = batch["label"] if self.denoiser.num_classes else None

    def loss_fn(trainable):
      params = state_lib.full_params(self.lora, trainable, frozen.base)
      pred = self.denoiser.predict(params, z_t, logsnr, label, train=True, rng=rng)
      return jnp.mean(self.distance(pred.x0, x_target, logsnr)), pred.x0

    (loss, x_hat), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state_lib.optimizer_update(state, grads, self.optimizer, self.optim,
                                                           self.num_steps)
    metrics = {"loss": loss, **update_metrics}
    for k, teacher_id in enumerate(self.teacher_ids):
      metrics[f"loss_{teacher_id}"] = jnp.mean(self.distance(x_hat, teacher_x[:, k], logsnr))
    new_state, guard = state_lib.keep_if_finite(new_state, state, loss,
                                                (update_metrics["grad_norm"], new_state.params))
    metrics.update(guard)
    return new_state, metrics

  def eval_params(self, state, frozen=None):
    return state_lib.full_params(self.lora, state.ema_params, None if frozen is None else frozen.base)
