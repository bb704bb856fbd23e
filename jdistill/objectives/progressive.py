"""Progressive distillation (Salimans & Ho, 2022): a student learns to do two teacher DDIM steps in
one; repeated, halving the steps each stage, each student becoming the next stage's teacher.

For a student with N steps: i ~ U{0..N-1}, t = (i+1)/N, s = t - 1/N, z_t = alpha_t x + sigma_t eps.
The teacher takes k deterministic DDIM steps t -> ... -> s from z_t (k = 2: t -> t - 1/2N -> s),
landing on z_s~. The student's target is the x that one student DDIM step from z_t maps onto z_s~:

    x_target = (z_s~ - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

and at the last step (s = 0) the teacher's own x prediction. The 'direct' variant
(`two_step=False`) always distils from the original teacher with k = N_teacher / N teacher steps
per student step (for N = 1: noise -> the teacher's full multi-step sample).

Student steps N, teacher sub-steps k and the stage length are traced values in `stage`, so one
compilation serves the whole schedule.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from jdistill import curriculum as curriculum_lib
from jdistill.diffusion import sampling
from jdistill.diffusion.losses import per_example_mse, weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.errors import check_choice
from jdistill.objectives import state as state_lib

FEATURE_SCHEDULES = ("linear", "cosine")


@flax.struct.dataclass
class ProgressiveFrozen:
  teacher: Any                    # the stage's teacher params (two-step: the previous student)
  student_base: Any = None        # LoRA: the frozen weights the adapters sit on


@flax.struct.dataclass
class ProgressiveStage:
  student_steps: Any              # N, int32
  num_steps: Any                  # train steps of the stage (the lr and feature schedules)
  teacher_substeps: Any           # k teacher DDIM steps per student step


def sample_student_time(rng, batch, student_steps):
  """i ~ U{0..N-1}; t = (i+1)/N, s = i/N."""
  i = jax.random.randint(rng, (batch,), 0, student_steps)
  n = student_steps.astype(jnp.float32)
  return (i + 1).astype(jnp.float32) / n, i.astype(jnp.float32) / n


@dataclasses.dataclass(frozen=True)
class FeatureDistillation:
  """loss += w(step) * mean_l ||f_l(student) - f_l(teacher)||^2 over U-Net activations `layers`,
  w moving from `weight_start` to `weight_end` over the stage (`linear` or `cosine`)."""
  layers: tuple = ("bottleneck",)
  weight_start: float = 1.0
  weight_end: float = 0.0
  schedule: str = "cosine"

  def weight(self, step, total):
    progress = jnp.clip(step / jnp.maximum(total, 1).astype(jnp.float32), 0.0, 1.0)
    check_choice("features.schedule", self.schedule, FEATURE_SCHEDULES)
    if self.schedule == "linear":
      return self.weight_start + (self.weight_end - self.weight_start) * progress
    return self.weight_end + (self.weight_start - self.weight_end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))


@dataclasses.dataclass(frozen=True)
class ProgressiveObjective(state_lib.Objective):
  denoiser: Any
  schedule: Any
  optimizer: Any
  optim: Any                      # config.optim (lr schedule, EMA decay and warmup)
  data_shape: tuple
  weighting: str = "snr_trunc"
  min_snr_gamma: float = 5.0      # gamma of the 'min_snr' weighting
  curriculum: Any = None          # None: i ~ U{0..N-1}; else an AdaptiveCurriculumScheduler
  features: Optional[FeatureDistillation] = None
  lora: Any = None                # a LoRA: only adapters train, over the frozen 'student_base'

  def new_state(self, student_init, rng=None):
    """A fresh student state: full params, or LoRA adapters over `student_init`."""
    params = state_lib.trainable(self.lora, student_init, rng)
    return curriculum_lib.attach(self.curriculum, state_lib.create(params, self.optimizer))

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def student_params(self, trainable, frozen):
    return state_lib.full_params(self.lora, trainable, frozen.student_base)

  def student_times(self, state, rng, batch, student_steps):
    """(t, s, importance weight) for the student's step t -> s on its N-step grid."""
    if self.curriculum is None:
      t, s = sample_student_time(rng, batch, student_steps)
      return t, s, jnp.ones((batch,))
    u, _ = self.curriculum.sample(state.curriculum, rng, batch)
    i = jnp.minimum(jnp.floor(u * student_steps), student_steps - 1)
    n = student_steps.astype(jnp.float32)
    return (i + 1) / n, i / n, self.curriculum.discrete_weight(state.curriculum, i, student_steps)

  def targets(self, teacher_params, batch, rng_eps, t, s, stage):
    """(z_t, logsnr_t, x_target, label) for one batch; no gradient flows into the teacher."""
    x = batch["x"]
    eps = jax.random.normal(rng_eps, x.shape)
    z_t, logsnr_t = forward_process(x, t, eps, self.schedule)
    label = batch["label"] if self.denoiser.num_classes else None
    predict = lambda z, logsnr: self.denoiser.predict(teacher_params, z, logsnr, label)
    z_s, teacher_x = sampling.ddim_segment(predict, self.schedule, z_t, t, s, stage.teacher_substeps)
    x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, logsnr_t, self.schedule(s), s)
    return z_t, logsnr_t, jax.lax.stop_gradient(x_target), label

  def train_step(self, state, batch, rng, frozen, stage):
    rng_target, rng_dropout = jax.random.split(rng)
    rng_t, rng_eps = jax.random.split(rng_target)
    t, s, importance = self.student_times(state, rng_t, batch["x"].shape[0], stage.student_steps)
    z_t, logsnr_t, x_target, label = self.targets(frozen.teacher, batch, rng_eps, t, s, stage)
    if self.features is not None:
      _, teacher_features = self.denoiser.predict_with_features(
          frozen.teacher, z_t, logsnr_t, label, self.features.layers)
      feature_weight = self.features.weight(state.step, stage.num_steps)

    def loss_fn(trainable):
      params = self.student_params(trainable, frozen)
      if self.features is None:
        pred = self.denoiser.predict(params, z_t, logsnr_t, label, train=True, rng=rng_dropout)
        feature_loss = jnp.zeros(())
      else:
        pred, student_features = self.denoiser.predict_with_features(
            params, z_t, logsnr_t, label, self.features.layers, train=True, rng=rng_dropout)
        feature_loss = sum(jnp.mean(jnp.square(a - jax.lax.stop_gradient(b)))
                           for a, b in zip(student_features, teacher_features)) / len(student_features)
      per_example = weighted_x_loss(pred.x0, x_target, logsnr_t, self.weighting, self.min_snr_gamma)
      loss = jnp.mean(importance * per_example)
      if self.features is not None:
        loss = loss + feature_weight * feature_loss
      return loss, (pred.x0, per_example, feature_loss)

    (loss, (x_hat, per_example, feature_loss)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    new_state, update_metrics = state_lib.optimizer_update(state, grads, self.optimizer, self.optim,
                                                           stage.num_steps)
    metrics = {
        "distill_loss": jnp.mean(per_example),
        "reconstruction_mse": jnp.mean(per_example_mse(x_hat, batch["x"])),  # diagnostic: vs data x
        **update_metrics}
    if self.features is not None:
      metrics.update(feature_loss=feature_loss, feature_weight=feature_weight)
    position = s + 0.5 / stage.student_steps            # the middle of the student's step
    new_state = curriculum_lib.advance(self.curriculum, state, new_state, position, per_example,
                                       metrics)
    new_state, guard = state_lib.keep_if_finite(new_state, state, loss,
                                                (update_metrics["grad_norm"], new_state.params))
    metrics.update(guard)
    return new_state, metrics

  def validation_loss(self, params, teacher_params, batch, rng, stage):
    """Mean distillation loss of `params` with uniform student times (comparable across samplers)."""
    rng_t, rng_eps = jax.random.split(rng)
    t, s = sample_student_time(rng_t, batch["x"].shape[0], stage.student_steps)
    z_t, logsnr_t, x_target, label = self.targets(teacher_params, batch, rng_eps, t, s, stage)
    pred = self.denoiser.predict(params, z_t, logsnr_t, label)
    return jnp.mean(weighted_x_loss(pred.x0, x_target, logsnr_t, self.weighting, self.min_snr_gamma))

  def eval_params(self, state, frozen=None):
    return self.student_params(state.ema_params, frozen)
