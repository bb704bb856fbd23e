"""Guided distillation, stage 1 (Meng et al., CVPR 2023, "On Distillation of Guided Diffusion
Models"): one network that does classifier-free guidance in one pass, at any strength w.

A class-conditional teacher guides with two passes,
    x_w(z_t, c) = (1 + w) x(z_t, c) - w x(z_t, null),
(in x, eps or v alike: each is linear in the other two at a fixed z_t, on either path). The student
x_s(z_t, c, w) is told w by a zero-initialised guidance embedding (models/unet.py), so it starts as
the conditional teacher at every w. Per example: x from the data with its label c,
t ~ U(0, 1), z_t = alpha_t x + sigma_t eps, w ~ U[w_min, w_max]; the loss is the teacher's own
denoising loss (config.diffusion.loss_weighting: v_mse on the VP path, flow_v_mse on the flow path)
with the guided x_w as its target:
    loss = weight(logsnr_t) ||x_s(z_t, c, w) - sg(x_w(z_t, c))||^2.
Stage 2 is progressive distillation of this student with every target computed at the example's
w (objectives/progressive.py `guidance_range`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jdistill.diffusion.losses import weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.models.denoiser import is_guidance_conditioned, with_guidance_embedding
from jdistill.objectives import state as state_lib


@flax.struct.dataclass
class GuidedFrozen:
  teacher: Any                    # the class-conditional teacher (its null class: label_dropout)


def draw_guidance(rng, batch: int, guidance_range):
  """w ~ U[w_min, w_max] per example."""
  w_min, w_max = guidance_range
  return jax.random.uniform(rng, (batch,), minval=w_min, maxval=w_max)


def training_guidance(rng, batch: int, guidance_range):
  """The w of a training step's examples: drawn per example (from `rng` folded with 11) for a
  guidance-conditioned student and its CFG teacher, or a static 0 (unguided) without a range."""
  if not guidance_range:
    return 0.0
  return draw_guidance(jax.random.fold_in(rng, 11), batch, guidance_range)


@dataclasses.dataclass(frozen=True)
class GuidedObjective(state_lib.OneNetworkObjective):
  guidance_range: tuple = (0.0, 4.0)    # (w_min, w_max): the paper's ImageNet-64 range
  weighting: str = "v_mse"              # the teacher's denoising loss
  min_snr_gamma: float = 5.0

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)),
                                             guided=True)["params"])

  def new_state(self, params, rng=None):
    """A student from `params` (the teacher's): plus a zero guidance embedding if they lack one."""
    if not is_guidance_conditioned(params):
      params = with_guidance_embedding(self.denoiser, params, jnp.zeros((1, *self.data_shape)))
    return state_lib.create(params, self.optimizer)

  def targets(self, teacher, batch, rng):
    """(z_t, logsnr_t, label, w, x_w): the guided teacher's x at the example's w."""
    rng_t, rng_eps, rng_w = jax.random.split(rng, 3)
    x, label = batch["x"], batch["label"]
    t = jax.random.uniform(rng_t, (x.shape[0],))
    z_t, logsnr_t = forward_process(x, t, jax.random.normal(rng_eps, x.shape), self.schedule)
    w = draw_guidance(rng_w, x.shape[0], self.guidance_range)
    x_w = self.denoiser.predict_guided(teacher, z_t, logsnr_t, label, w).x0
    return z_t, logsnr_t, label, w, jax.lax.stop_gradient(x_w)

  def loss(self, params, teacher, batch, rng):
    rng_target, rng_dropout = jax.random.split(rng)
    z_t, logsnr_t, label, w, x_w = self.targets(teacher, batch, rng_target)
    pred = self.denoiser.predict(params, z_t, logsnr_t, label, guidance=w, train=True,
                                 rng=rng_dropout)
    per_example = weighted_x_loss(pred.x0, x_w, logsnr_t, self.weighting, self.min_snr_gamma)
    return jnp.mean(per_example), {"x_mse": jnp.mean(jnp.square(pred.x0 - x_w))}

  def train_step(self, state, batch, rng, frozen, stage):
    return state_lib.descend(state, self.loss, (frozen.teacher, batch, rng), self.optimizer,
                             self.optim, self.num_steps)

  def eval_params(self, state, frozen=None):
    return state.ema_params
