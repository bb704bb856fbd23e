"""Reflow (Liu et al. 2023, "Flow Straight and Fast"; InstaFlow, Liu et al. 2024): straighten the
teacher's ODE on its own couplings, then distil the straightened flow into one step.

Couplings (z_1, x): fixed noise z_1 and the sample x the model being straightened reaches from it
by its ODE (sampling.teacher_couplings, computed before each stage).
  'reflow' stage, the 2-rectified flow (initialised from the teacher):
      t ~ U(0, 1),  z_t = alpha_t x + sigma_t z_1   (on the flow path: (1 - tau) x + tau z_1),
      loss = w(logsnr_t) ||x_hat(z_t) - x||^2       (flow_v_mse: ||v_hat - (z_1 - x)||^2, the
                                                     straight line's velocity)
  'distill' stage, one step (initialised from the 2-rectified flow, on its couplings):
      loss = ||x_hat(z_1, t = 1) - x||^2            (the paper's k = 1 distillation, with the MSE
                                                     where InstaFlow uses LPIPS)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jdistill.diffusion.losses import per_example_mse, weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.objectives import state as state_lib


@flax.struct.dataclass
class ReflowFrozen:
  couplings: Any                  # {label (N,), trajectory (N, 2, ...)}: [:, 0] z_1, [:, 1] x


@flax.struct.dataclass
class ReflowStage:
  distill: Any                    # bool: the one-step distillation (t = 1) instead of reflow
  num_steps: Any                  # train steps of the stage (its lr schedule)


@dataclasses.dataclass(frozen=True)
class ReflowObjective(state_lib.OneNetworkObjective):
  weighting: str = "flow_v_mse"
  min_snr_gamma: float = 5.0

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def new_state(self, params, rng=None):
    return state_lib.create(params, self.optimizer)

  def loss(self, params, couplings, batch_size: int, stage, rng):
    rng_pick, rng_t = jax.random.split(rng)
    pick = jax.random.randint(rng_pick, (batch_size,), 0, couplings["trajectory"].shape[0])
    noise, x = couplings["trajectory"][pick, 0], couplings["trajectory"][pick, -1]
    label = couplings["label"][pick] if self.denoiser.num_classes else None
    t = jnp.where(stage.distill, 1.0, jax.random.uniform(rng_t, (batch_size,)))
    z_t, logsnr = forward_process(x, t, noise, self.schedule)
    z_t = jnp.where(stage.distill, noise, z_t)          # the sampler's start: z_1 = noise itself
    x_hat = self.denoiser.predict(params, z_t, logsnr, label).x0
    per_example = jnp.where(stage.distill, per_example_mse(x_hat, x),
                            weighted_x_loss(x_hat, x, logsnr, self.weighting, self.min_snr_gamma))
    return jnp.mean(per_example), {}

  def train_step(self, state, batch, rng, frozen, stage):
    return state_lib.descend(state, self.loss, (frozen.couplings, batch["x"].shape[0], stage, rng),
                             self.optimizer, self.optim, stage.num_steps)

  def eval_params(self, state, frozen=None):
    return state.ema_params
