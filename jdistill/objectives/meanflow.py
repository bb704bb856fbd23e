"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"), as distillation.

On the flow path z_t = (1 - t) x + t e (t: flow time, 1 is noise; any teacher, VP or flow: the
Denoiser takes the VP state z = z_t (alpha + sigma) at logsnr = 2 log((1 - t) / t), and a velocity
is read as pred.eps - pred.x0), the student is a flow map: its average velocity over [r, t],
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   so   z_r = z_t - (t - r) u(z_t, r, t),
told the interval h = t - r by a zero-initialised embedding (models/unet.py): at r = t it is the
teacher's velocity. The MeanFlow identity (d/dt of (t - r) u = int_r^t v) gives its target,
    u_tgt = v(z_t, t) - (t - r) du/dt,   du/dt = v . d_z u + d_t u,
du/dt from ONE `jax.jvp` of u in (z, r, t) with tangent (v, 0, 1), whose primal is the u trained:
    loss = sg(w) ||u - sg(u_tgt)||^2,   w = 1 / (||u - u_tgt||^2 + c)^p      (adaptive weighting),
with ||.||^2 the per-example mean square. v is the teacher's velocity at (z_t, t) (distillation,
the default) or the data's e - x (`velocity_source='data'`, the paper's training from scratch).
(r, t): two logit-normal draws, t the larger; r = t for a share `equal_share` of the batch.
Sampling (diffusion/sampling.py 'flowmap'): x = z_1 - u(z_1, 0, 1); 2 steps through t = 0.5.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jdistill.diffusion.parameterization import broadcast_to_data
from jdistill.diffusion.schedules import LOGSNR_MAX, LOGSNR_MIN, alpha_sigma
from jdistill.models.denoiser import is_flow_map, is_guidance_conditioned, with_zero_embedding
from jdistill.objectives import state as state_lib
from jdistill.objectives.guided import training_guidance

VELOCITY_SOURCES = ("teacher", "data")


@flax.struct.dataclass
class MeanFlowFrozen:
  teacher: Any                    # the teacher's params (its velocity v; the student's start)


def flow_to_vp(z_flow, t):
  """(z, logsnr): the VP state of flow state `z_flow` at flow time t (per example), logSNR =
  2 log((1 - t) / t) clipped to the schedules' range, z = z_flow (alpha + sigma)."""
  logsnr = jnp.clip(2.0 * (jnp.log1p(-t) - jnp.log(t)), LOGSNR_MIN, LOGSNR_MAX)
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z_flow))
  return z_flow * (alpha + sigma), logsnr


def adaptive_weight(delta_sq, c: float, p: float):
  """The paper's adaptive loss weight sg(1 / (||delta||^2 + c)^p)."""
  return jax.lax.stop_gradient(1.0 / (delta_sq + c) ** p)


def draw_times(rng, batch: int, mean: float, std: float, equal_share: float):
  """(r, t): t >= r, both logit-normal(mean, std); r = t with probability `equal_share`."""
  rng_a, rng_b, rng_eq = jax.random.split(rng, 3)
  a = jax.nn.sigmoid(mean + std * jax.random.normal(rng_a, (batch,)))
  b = jax.nn.sigmoid(mean + std * jax.random.normal(rng_b, (batch,)))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  return jnp.where(jax.random.uniform(rng_eq, (batch,)) < equal_share, t, r), t


@dataclasses.dataclass(frozen=True)
class MeanFlowObjective(state_lib.OneNetworkObjective):
  velocity_source: str = "teacher"
  time_mean: float = -0.4         # logit-normal of (r, t)
  time_std: float = 1.0
  equal_share: float = 0.75       # share of r = t
  weight_c: float = 1e-3          # adaptive weighting w = 1 / (||delta||^2 + c)^p
  weight_p: float = 1.0
  guidance_range: tuple = ()      # (w_min, w_max): a flow map told the CFG weight w (per example),
                                  # v the teacher's two-pass CFG velocity at w

  def init_state(self, rng):
    example = jnp.zeros((1, *self.data_shape))
    return self.new_state(self.denoiser.init(rng, example, flow_map=True,
                                             guided=bool(self.guidance_range))["params"])

  def new_state(self, params, rng=None):
    """A student from `params` (the teacher's): plus a zero interval embedding (and a zero
    guidance embedding, with a `guidance_range`) if they lack one."""
    guided = bool(self.guidance_range) and not is_guidance_conditioned(params)
    if guided or not is_flow_map(params):
      params = with_zero_embedding(self.denoiser, params, jnp.zeros((1, *self.data_shape)),
                                   flow_map=True, guided=guided)
    return state_lib.create(params, self.optimizer)

  def average_velocity(self, params, z_flow, r, t, label, guidance=0.0):
    """u(z_t, r, t) of flow-map `params` (at r = t: the velocity v(z_t, t)); `guidance`: the w a
    guidance-conditioned flow map is told, or the teacher's two-pass CFG weight."""
    z, logsnr = flow_to_vp(z_flow, t)
    pred = self.denoiser.predict_with_guidance(params, z, logsnr, label, guidance, interval=t - r)
    return pred.eps - pred.x0

  def identity_terms(self, params, teacher, x, noise, r, t, label, w=0.0):
    """(u, u_tgt, du/dt, v) at z_t = (1 - t) x + t noise: u and du/dt from one JVP; `w`: the CFG
    weight of the teacher's v and the student's, per example (0: unguided)."""
    z_flow = (1.0 - broadcast_to_data(t, x)) * x + broadcast_to_data(t, x) * noise
    if self.velocity_source == "data":
      v = noise - x
    else:
      v = jax.lax.stop_gradient(self.average_velocity(teacher, z_flow, t, t, label, w))
    u, du_dt = jax.jvp(lambda z_, r_, t_: self.average_velocity(params, z_, r_, t_, label, w),
                       (z_flow, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    u_tgt = jax.lax.stop_gradient(v - broadcast_to_data(t - r, x) * du_dt)
    return u, u_tgt, jax.lax.stop_gradient(du_dt), v

  def loss(self, params, teacher, batch, rng):
    rng_noise, rng_time = jax.random.split(rng)
    x = batch["x"]
    label = batch["label"] if self.denoiser.num_classes else None
    noise = jax.random.normal(rng_noise, x.shape, x.dtype)
    r, t = draw_times(rng_time, x.shape[0], self.time_mean, self.time_std, self.equal_share)
    w = training_guidance(rng, x.shape[0], self.guidance_range)
    u, u_tgt, du_dt, _ = self.identity_terms(params, teacher, x, noise, r, t, label, w)
    axes = tuple(range(1, x.ndim))
    delta_sq = jnp.mean((u - u_tgt) ** 2, axis=axes)
    weight = adaptive_weight(delta_sq, self.weight_c, self.weight_p)
    tangent_norm = jnp.sqrt(jnp.mean(du_dt**2, axis=axes))
    return jnp.mean(weight * delta_sq), {
        "mse": jnp.mean(delta_sq), "tangent_norm": jnp.mean(tangent_norm),
        "tangent_norm_max": jnp.max(tangent_norm), "weight_min": jnp.min(weight),
        "weight_max": jnp.max(weight)}

  def train_step(self, state, batch, rng, frozen, stage):
    return state_lib.descend(state, self.loss, (frozen.teacher, batch, rng), self.optimizer,
                             self.optim, self.num_steps, checked=("tangent_norm_max",))

  def eval_params(self, state, frozen=None):
    return state.ema_params
