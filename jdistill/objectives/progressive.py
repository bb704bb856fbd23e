"""Progressive distillation (Salimans & Ho, 2022): a student learns to do two teacher DDIM steps in
one; repeated, halving the steps each stage, each student becoming the next stage's teacher.

Grids nest (`nested_grids`): the original teacher samples on the uniform grid i / N_0, and each
student's grid is a subset of its teacher's, every student step spanning two adjacent teacher
steps, except one step spanning a single teacher step where the teacher's count is odd (so the
counts halve: N = ceil(N_teacher / 2), e.g. 25, 13, 7, 4, 2, 1). A distilled teacher is thereby only
ever asked for the steps it learned.

For a student with N steps on its grid t_0 = 0 < ... < t_N = 1: i ~ U{0..N-1}, t = t_{i+1},
s = t_i, z_t = alpha_t x + sigma_t eps. The teacher takes deterministic DDIM steps over its own grid
points from t down to s (two, or one), landing on z_s~. The student's target is the x that one
student DDIM step from z_t maps onto z_s~:

    x_target = (z_s~ - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

and at the last step (s = 0) the teacher's own x prediction. The 'direct' variant
(`two_step=False`) always distils from the original teacher, over every point of its uniform grid
inside [s, t] (for N = 1: noise -> the teacher's full multi-step sample).

The student's step count, its grid, the grid of the teacher's chain and the stage length are
traced values in `stage` (grids padded to the schedule's longest), so one compilation serves the
whole schedule.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdistill import curriculum as curriculum_lib
from jdistill.diffusion import sampling
from jdistill.diffusion.losses import per_example_mse, weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.errors import check_choice
from jdistill.objectives import state as state_lib
from jdistill.objectives.guided import draw_guidance

FEATURE_SCHEDULES = ("linear", "cosine")


@flax.struct.dataclass
class ProgressiveFrozen:
  teacher: Any                    # the stage's teacher params (two-step: the previous student)
  student_base: Any = None        # LoRA: the frozen weights the adapters sit on


@flax.struct.dataclass
class ProgressiveStage:
  student_steps: Any              # N, int32
  num_steps: Any                  # train steps of the stage (the lr and feature schedules)
  teacher_substeps: Any           # the most teacher DDIM steps inside one student step
  teacher_grid: Any               # float32 (N_0 + 1,): the time points of the teacher's chain
  student_points: Any             # int32 (N_1 + 1,): student grid point j = teacher_grid[student_points[j]]


def halving_chain(teacher_steps: int):
  """N_0, ceil(N_0 / 2), ..., 1: the step counts whose grids nest."""
  chain = [teacher_steps]
  while chain[-1] > 1:
    chain.append(-(-chain[-1] // 2))
  return chain


def nested_grids(steps):
  """Each count's grid in `steps` as indices into the original teacher's uniform grid (time =
  index / steps[0]). Every count must lie on `halving_chain(steps[0])`: each grid is made from the
  chain's previous one by merging adjacent pairs of steps.

  Halving an odd count leaves one single step; it goes at whichever end of the teacher's grid has
  the wider outermost step, the low-noise end on a tie (the uniform base grid, where the 13-step
  student's last step then copies the teacher's final denoising step). So a short step left by one
  halving is merged by the next: 25 -> 13 -> 7 -> 4 gives [0, 3, 11, 19, 25] / 25, where keeping
  the single step at one end would keep a 1/25 step through every stage (8, 8, 8 and 1 / 25)."""
  chain = halving_chain(steps[0])
  unreachable = [n for n in steps[1:] if n not in chain]
  if unreachable:
    raise ValueError(f"step counts {unreachable} are not on the halving chain {chain}")
  grids = {steps[0]: list(range(steps[0] + 1))}
  grid = grids[steps[0]]
  for n in chain[1:]:
    if len(grid) % 2 == 1:                      # an even count: pairs
      grid = grid[::2]
    elif grid[1] - grid[0] >= grid[-1] - grid[-2]:
      grid = grid[:1] + grid[1::2]              # the single step at the low-noise end
    else:
      grid = grid[::2] + grid[-1:]              # ... at the high-noise end
    grids[n] = grid
  return [grids[n] for n in steps]


def make_stage(grids, k: int, num_steps: int, two_step: bool = True) -> ProgressiveStage:
  """Stage k's traced values, from `grids = nested_grids(steps)`: the student sits on grids[k + 1];
  the teacher's chain runs on the stage teacher's grids[k], or (direct) the original's grids[0].
  Arrays are padded to the first stage's lengths, so every stage has the same shapes."""
  chain = grids[k] if two_step else grids[0]
  points = [chain.index(p) for p in grids[k + 1]]
  teacher_grid = np.ones(len(grids[0]))
  teacher_grid[:len(chain)] = np.asarray(chain) / grids[0][-1]
  student_points = np.full(len(grids[1]), points[-1])
  student_points[:len(points)] = points
  return ProgressiveStage(student_steps=jnp.int32(len(points) - 1), num_steps=jnp.int32(num_steps),
                          teacher_substeps=jnp.int32(max(np.diff(points))),
                          teacher_grid=jnp.asarray(teacher_grid, jnp.float32),
                          student_points=jnp.asarray(student_points, jnp.int32))


def student_grid(stage):
  """The student's time points (padded with 1.0 past t_N = 1)."""
  return stage.teacher_grid[stage.student_points]


def student_step_times(stage, i):
  """(t, s) of student step i: t_{i+1} -> t_i."""
  grid = student_grid(stage)
  return grid[i + 1], grid[i]


def teacher_chain(predict_fn, schedule, z_t, i, stage):
  """The teacher's DDIM steps over its grid points inside student step i (per example):
  (z_s, the last step's x prediction)."""
  return sampling.ddim_chain(predict_fn, schedule, z_t, stage.teacher_grid,
                             stage.student_points[i + 1], stage.student_points[i],
                             stage.teacher_substeps)


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
  guidance_range: tuple = ()      # (w_min, w_max): guided distillation's stage 2, a guidance-
                                  # conditioned teacher and student, each target at w ~ U[w_min, w_max]

  def new_state(self, student_init, rng=None):
    """A fresh student state: full params, or LoRA adapters over `student_init`."""
    params = state_lib.trainable(self.lora, student_init, rng)
    return curriculum_lib.attach(self.curriculum, state_lib.create(params, self.optimizer))

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)),
                                             guided=bool(self.guidance_range))["params"])

  def student_params(self, trainable, frozen):
    return state_lib.full_params(self.lora, trainable, frozen.student_base)

  def student_step_indices(self, state, rng, batch, stage):
    """(i, importance weight): the student steps t_{i+1} -> t_i to train on."""
    if self.curriculum is None:
      return jax.random.randint(rng, (batch,), 0, stage.student_steps), jnp.ones((batch,))
    u, _ = self.curriculum.sample(state.curriculum, rng, batch)
    i = jnp.sum(student_grid(stage)[None, 1:] <= u[:, None], axis=-1)   # t_i <= u < t_{i+1}
    t, s = student_step_times(stage, i)
    return i, self.curriculum.interval_weight(state.curriculum, s, t, stage.student_steps)

  def targets(self, teacher_params, batch, rng_eps, i, stage):
    """(z_t, logsnr_t, x_target, label, w) for one batch (w: the examples' guidance weights with a
    `guidance_range`, else None); no gradient flows into the teacher."""
    x = batch["x"]
    eps = jax.random.normal(rng_eps, x.shape)
    t, s = student_step_times(stage, i)
    z_t, logsnr_t = forward_process(x, t, eps, self.schedule)
    label = batch["label"] if self.denoiser.num_classes else None
    w = (draw_guidance(jax.random.fold_in(rng_eps, 1), x.shape[0], self.guidance_range)
         if self.guidance_range else None)
    predict = lambda z, logsnr: self.denoiser.predict(teacher_params, z, logsnr, label, guidance=w)
    z_s, teacher_x = teacher_chain(predict, self.schedule, z_t, i, stage)
    x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, logsnr_t, self.schedule(s), s)
    return z_t, logsnr_t, jax.lax.stop_gradient(x_target), label, w

  def train_step(self, state, batch, rng, frozen, stage):
    rng_target, rng_dropout = jax.random.split(rng)
    rng_t, rng_eps = jax.random.split(rng_target)
    i, importance = self.student_step_indices(state, rng_t, batch["x"].shape[0], stage)
    z_t, logsnr_t, x_target, label, w = self.targets(frozen.teacher, batch, rng_eps, i, stage)
    if self.features is not None:
      _, teacher_features = self.denoiser.predict_with_features(
          frozen.teacher, z_t, logsnr_t, label, self.features.layers)
      feature_weight = self.features.weight(state.step, stage.num_steps)

    def loss_fn(trainable):
      params = self.student_params(trainable, frozen)
      if self.features is None:
        pred = self.denoiser.predict(params, z_t, logsnr_t, label, train=True, rng=rng_dropout,
                                     guidance=w)
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
    t, s = student_step_times(stage, i)
    position = 0.5 * (s + t)                            # the middle of the student's step
    new_state = curriculum_lib.advance(self.curriculum, state, new_state, position, per_example,
                                       metrics)
    new_state, guard = state_lib.keep_if_finite(new_state, state, loss,
                                                (update_metrics["grad_norm"], new_state.params))
    metrics.update(guard)
    return new_state, metrics

  def validation_loss(self, params, teacher_params, batch, rng, stage):
    """Mean distillation loss of `params` with uniform student times (comparable across samplers)."""
    rng_t, rng_eps = jax.random.split(rng)
    i = jax.random.randint(rng_t, (batch["x"].shape[0],), 0, stage.student_steps)
    z_t, logsnr_t, x_target, label, w = self.targets(teacher_params, batch, rng_eps, i, stage)
    pred = self.denoiser.predict(params, z_t, logsnr_t, label, guidance=w)
    return jnp.mean(weighted_x_loss(pred.x0, x_target, logsnr_t, self.weighting, self.min_snr_gamma))

  def eval_params(self, state, frozen=None):
    return self.student_params(state.ema_params, frozen)
