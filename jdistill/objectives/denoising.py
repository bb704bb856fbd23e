"""Teacher training: the denoising objective.

  t ~ U(0, 1) (or logit-normal, SD3),  eps ~ N(0, I),  z_t = alpha_t x + sigma_t eps,
  loss = E[ w(logsnr_t) ||x_hat(z_t) - x||^2 ]   (w from jdistill/diffusion/losses.py)
Class labels are dropped to the null class with probability `label_dropout` (for CFG).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jdistill import curriculum as curriculum_lib
from jdistill.diffusion.losses import weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.objectives import state as state_lib


def drop_labels(label, rng, probability, null_class):
  if label is None or probability <= 0:
    return label
  return jnp.where(jax.random.uniform(rng, label.shape) < probability, null_class, label)


def draw_times(rng, batch: int, sampling: str = "uniform", logit_mean: float = 0.0,
               logit_std: float = 1.0):
  """Training times: t ~ U(0, 1), or 'logit_normal': t = sigmoid(n), n ~ N(mean, std^2)."""
  if sampling == "uniform":
    return jax.random.uniform(rng, (batch,))
  if sampling == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,)))
  raise ValueError(f"diffusion.time_sampling: unknown {sampling!r}")


@flax.struct.dataclass
class DenoisingFrozen:
  base: Any = None                # LoRA: the frozen weights the adapters sit on (the fine-tuned teacher)


@dataclasses.dataclass(frozen=True)
class DenoisingObjective(state_lib.OneNetworkObjective):
  weighting: str = "v_mse"
  min_snr_gamma: float = 5.0
  label_dropout: float = 0.1
  time_sampling: str = "uniform"   # without a curriculum: 'uniform' | 'logit_normal' (draw_times)
  logit_mean: float = 0.0
  logit_std: float = 1.0
  curriculum: Any = None           # an AdaptiveCurriculumScheduler draws t instead
  lora: Any = None                 # a LoRA: only adapters train, over frozen.base

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def new_state(self, params, rng=None):
    """A fresh state (optimizer, EMA, curriculum) around `params` (a fine-tune starts from a
    teacher), or around LoRA adapters over them."""
    return curriculum_lib.attach(
        self.curriculum, state_lib.create(state_lib.trainable(self.lora, params, rng), self.optimizer))

  def loss(self, params, batch, rng, curriculum_state=None, frozen=None):
    x = batch["x"]
    rng_t, rng_eps, rng_drop, rng_dropout = jax.random.split(rng, 4)
    if self.curriculum is None:
      t = draw_times(rng_t, x.shape[0], self.time_sampling, self.logit_mean, self.logit_std)
      importance = 1.0
    else:
      t, importance = self.curriculum.sample(curriculum_state, rng_t, x.shape[0])
    eps = jax.random.normal(rng_eps, x.shape)
    z_t, logsnr = forward_process(x, t, eps, self.schedule)
    label = batch["label"] if self.denoiser.num_classes else None
    label = drop_labels(label, rng_drop, self.label_dropout, self.denoiser.num_classes)
    params = state_lib.full_params(self.lora, params, None if frozen is None else frozen.base)
    pred = self.denoiser.predict(params, z_t, logsnr, label, train=True, rng=rng_dropout)
    per_example = weighted_x_loss(pred.x0, x, logsnr, self.weighting, self.min_snr_gamma)
    return jnp.mean(importance * per_example), (t, per_example)

  def train_step(self, state, batch, rng, frozen, stage):
    del stage
    (loss, (t, per_example)), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, batch, rng, state.curriculum, frozen)
    new_state, update_metrics = state_lib.optimizer_update(state, grads, self.optimizer, self.optim,
                                                           self.num_steps)
    metrics = {"loss": loss, **update_metrics}
    new_state = curriculum_lib.advance(self.curriculum, state, new_state, t, per_example, metrics)
    new_state, guard = state_lib.keep_if_finite(new_state, state, loss,
                                                (update_metrics["grad_norm"], new_state.params))
    metrics.update(guard)
    return new_state, metrics

  def eval_params(self, state, frozen=None):
    return state_lib.full_params(self.lora, state.ema_params, None if frozen is None else frozen.base)
