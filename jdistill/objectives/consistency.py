"""Consistency distillation: continuous-time sCD (Lu & Song 2025, "Simplifying, stabilizing and
scaling continuous-time consistency models") and the classic discrete CD (Song et al. 2023).

TrigFlow in jdistill's coordinates. The VP state z = alpha x + sigma eps at logsnr is TrigFlow's
x_t = cos(t) x0 + sin(t) z with angle t = arctan(exp(-logsnr / 2)) (alpha = cos t, sigma = sin t)
and sigma_d = 1 (eps has unit variance; x is in data units, so EDM's noise level is tan t). The
VP v = alpha eps - sigma x = dz/dt is TrigFlow's velocity, so a network's F := pred.v is the
v-prediction and its consistency function is exactly the Prediction's x0:
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t, t) = alpha z - sigma v = x0-hat.

sCD (its Algorithm 1, distillation): t from tan(t) = exp(P_mean + P_std n) / sigma_d, i.e. logsnr
= -2 (P_mean + P_std n); dx_t/dt = sigma_d F_teacher(x_t, t); F-, dF-/dt of the student at its
stop-gradient params by one `jax.jvp` in (z, logsnr) with tangent cos(t) sin(t) (dx_t/dt, dlogsnr/dt)
= (cos t sin t dx_t/dt, -2): J = cos t sin t dF-/dt, finite at both ends. Then
    g = -cos^2(t) (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + sigma_d J)    (= cos(t) df-/dt)
    g = g / (||g|| + c)                                                       (tangent normalisation)
    loss = e^{w(t)} / D ||F_theta(x_t, t) - F- - g||^2 - w(t)                 (adaptive weight w)
with r warming up linearly from 0 to 1 over the first `warmup_steps` and w a tiny MLP on the
time embedding, trained jointly. Samplers (re-noising, diffusion/sampling.py 'renoise'): 1 step
f(z_1, 1); 2 steps through the paper's t = 1.1 at its sigma_d = 0.5 (EDM sigma 0.5 tan 1.1).

CD: an N-point Karras grid sigma_1 = sigma_min < ... < sigma_N (rho = 7) of EDM noise levels; for
n ~ U{1..N-1}, x_{n+1} = x + sigma_{n+1} eps, one teacher DDIM (= Euler in EDM's x) step to
sigma_n gives x-hat_n, and
    loss = ||f_theta(x_{n+1}, sigma_{n+1}) - f_target(x-hat_n, sigma_n)||^2   (target: EMA, mu)
with the boundary scalings of the paper's f = c_skip x + c_out F (F the EDM network output, here
read from the Prediction's x0 = c_skip' x + c_out' F with EDM's c_skip', c_out'), so f = x at
sigma_min:  c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
c_out = sigma_data (sigma - sigma_min) / sqrt(sigma_data^2 + sigma^2), sigma_data = 0.5.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.parameterization import broadcast_to_data
from jdistill.diffusion.sampling import ddim_step
from jdistill.diffusion.schedules import LOGSNR_MAX, LOGSNR_MIN, alpha_sigma
from jdistill.models.denoiser import is_guidance_conditioned, with_guidance_embedding
from jdistill.models.unet import logsnr_embedding
from jdistill.objectives import state as state_lib
from jdistill.objectives.guided import training_guidance

SIGMA_DATA = 0.5                  # EDM's data std, of CD's c_skip / c_out


@flax.struct.dataclass
class ConsistencyFrozen:
  teacher: Any


class AdaptiveWeight(nn.Module):
  """sCM's adaptive loss weight w(t): a tiny MLP on the time embedding, a scalar per example
  (zero at initialisation)."""
  hidden: int = 32

  @nn.compact
  def __call__(self, logsnr):
    h = nn.swish(nn.Dense(self.hidden)(logsnr_embedding(logsnr, self.hidden)))
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


def proposal_logsnr(rng, batch: int, p_mean: float, p_std: float):
  """sCM's proposal tan(t) = exp(P_mean + P_std n) / sigma_d (sigma_d = 1): logsnr = -2 log tan t."""
  n = jax.random.normal(rng, (batch,))
  return jnp.clip(-2.0 * (p_mean + p_std * n), LOGSNR_MIN, LOGSNR_MAX)


def normalise(g, c: float):
  """g / (||g|| + c), ||g|| per example."""
  norm = jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim)), keepdims=True))
  return g / (norm + c)


def scd_tangent(student_v, teacher_v, z, logsnr, warmup, c: float):
  """(normalised g, raw g) of sCD at (z, logsnr): `student_v(z, logsnr)` is F- (stop-gradient
  params), `teacher_v` dx_t/dt; `warmup` is r in [0, 1]."""
  f_minus, jvp = jax.jvp(student_v, (z, logsnr), (_cos_sin(logsnr, z) * teacher_v,
                                                  jnp.full_like(logsnr, -2.0)))
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  g = -(alpha**2) * (f_minus - teacher_v) - warmup * (alpha * sigma * z + jvp)
  return jax.lax.stop_gradient(normalise(g, c)), jax.lax.stop_gradient(g), f_minus


def _cos_sin(logsnr, like):
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, like))
  return alpha * sigma


@dataclasses.dataclass(frozen=True)
class GuidanceConditioned:
  """A consistency student told the CFG weight w (config.student_guidance): w ~ U[w_min, w_max] per
  example, the teacher guided at it with two passes, the student told it (its zero-initialised
  guidance embedding, so it starts as the conditional teacher at every w)."""
  guidance_range: tuple = ()

  def student_params(self, params):
    if self.guidance_range and not is_guidance_conditioned(params):
      params = with_guidance_embedding(self.denoiser, params, jnp.zeros((1, *self.data_shape)))
    return params



@dataclasses.dataclass(frozen=True)
class SCDObjective(GuidanceConditioned, state_lib.OneNetworkObjective):
  """sCD; the state's params are {'net': the consistency model, 'weighting': AdaptiveWeight}."""
  p_mean: float = -1.0
  p_std: float = 1.4
  tangent_c: float = 0.1
  warmup_steps: int = 1000

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"], rng)

  def new_state(self, params, rng=None):
    rng = jax.random.key(0) if rng is None else rng
    weighting = AdaptiveWeight().init(rng, jnp.zeros((1,)))["params"]
    return state_lib.create({"net": self.student_params(params), "weighting": weighting},
                            self.optimizer)

  def velocity(self, params, z, logsnr, label, w=0.0):
    """F(x_t, t) = the VP v (TrigFlow's v-prediction, sigma_d = 1) at CFG weight `w`."""
    return self.denoiser.predict_with_guidance(params, z, logsnr, label, w).v

  def loss(self, params, teacher, batch, rng, warmup):
    rng_noise, rng_time = jax.random.split(rng)
    x = batch["x"]
    label = batch["label"] if self.denoiser.num_classes else None
    logsnr = proposal_logsnr(rng_time, x.shape[0], self.p_mean, self.p_std)
    alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, x))
    z = alpha * x + sigma * jax.random.normal(rng_noise, x.shape, x.dtype)
    w = training_guidance(rng, x.shape[0], self.guidance_range)
    teacher_v = jax.lax.stop_gradient(self.velocity(teacher, z, logsnr, label, w))
    frozen_net = jax.lax.stop_gradient(params["net"])
    g, raw, f_minus = scd_tangent(lambda z_, l_: self.velocity(frozen_net, z_, l_, label, w),
                                  teacher_v, z, logsnr, warmup, self.tangent_c)
    f_minus = jax.lax.stop_gradient(f_minus)
    weight = AdaptiveWeight().apply({"params": params["weighting"]}, logsnr)
    axes = tuple(range(1, x.ndim))
    mse = jnp.mean((self.velocity(params["net"], z, logsnr, label, w) - f_minus - g) ** 2,
                   axis=axes)
    tangent_norm = jnp.sqrt(jnp.sum(raw**2, axis=axes))
    return jnp.mean(jnp.exp(weight) * mse - weight), {
        "mse": jnp.mean(mse), "tangent_norm": jnp.mean(tangent_norm),
        "tangent_norm_max": jnp.max(tangent_norm), "weight_min": jnp.min(weight),
        "weight_max": jnp.max(weight), "tangent_warmup": warmup}

  def train_step(self, state, batch, rng, frozen, stage):
    warmup = jnp.minimum(1.0, state.step.astype(jnp.float32) / max(self.warmup_steps, 1))
    return state_lib.descend(state, self.loss, (frozen.teacher, batch, rng, warmup),
                             self.optimizer, self.optim, self.num_steps,
                             checked=("tangent_norm_max",))

  def eval_params(self, state, frozen=None):
    return state.ema_params["net"]


def karras_sigmas(num_points: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
  """sigma_1 < ... < sigma_N: (sigma_min^(1/rho) + i / (N - 1) (sigma_max^(1/rho) - ...))^rho."""
  ramp = np.linspace(0.0, 1.0, num_points)
  lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
  return (lo + ramp * (hi - lo)) ** rho


def boundary_scalings(sigma, sigma_min: float):
  """(c_skip, c_out) of the consistency function, and EDM's (c_skip', c_out') of the network."""
  c_skip = SIGMA_DATA**2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA**2)
  c_out = SIGMA_DATA * (sigma - sigma_min) / jnp.sqrt(SIGMA_DATA**2 + sigma**2)
  edm_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
  edm_out = SIGMA_DATA * sigma / jnp.sqrt(SIGMA_DATA**2 + sigma**2)
  return c_skip, c_out, edm_skip, edm_out


def consistency_function(x0_hat, z, sigma, sigma_min: float):
  """f = c_skip x + c_out F, with x = z / alpha the EDM state and F = (x0_hat - c_skip' x) / c_out'
  the EDM output behind the Prediction's x0: f(sigma_min) = x exactly."""
  sigma = broadcast_to_data(sigma, z)
  x = z * jnp.sqrt(1.0 + sigma**2)               # z / alpha, alpha = 1 / sqrt(1 + sigma^2)
  c_skip, c_out, edm_skip, edm_out = boundary_scalings(sigma, sigma_min)
  return c_skip * x + c_out * (x0_hat - edm_skip * x) / edm_out


@flax.struct.dataclass
class CDState:
  step: jnp.ndarray
  student: state_lib.TrainState
  target: Any                     # theta-: EMA of the student's params at rate `target_decay`


@dataclasses.dataclass(frozen=True)
class CDObjective(GuidanceConditioned, state_lib.OneNetworkObjective):
  num_points: int = 18            # N
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  target_decay: float = 0.95      # mu

  def sigmas(self):
    return jnp.asarray(karras_sigmas(self.num_points, self.sigma_min, self.sigma_max), jnp.float32)

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def new_state(self, params, rng=None):
    params = self.student_params(params)
    return CDState(step=jnp.zeros((), jnp.int32), student=state_lib.create(params, self.optimizer),
                   target=params)

  def f(self, params, z, sigma, label, w=0.0):
    """The consistency function at VP state z and EDM level sigma (logsnr = -2 log sigma), at CFG
    weight `w`."""
    x0_hat = self.denoiser.predict_with_guidance(params, z, -2.0 * jnp.log(sigma), label, w).x0
    return consistency_function(x0_hat, z, sigma, self.sigma_min)

  def pair(self, teacher, x, noise, n, label, w=0.0):
    """(z at sigma_{n+1}, z-hat at sigma_n by one teacher DDIM step (guided at w), sigma_{n+1},
    sigma_n); n is the 0-based index of the lower point."""
    sigmas = self.sigmas()
    hi, lo = sigmas[n + 1], sigmas[n]
    logsnr_hi, logsnr_lo = -2.0 * jnp.log(hi), -2.0 * jnp.log(lo)
    alpha, sigma = alpha_sigma(broadcast_to_data(logsnr_hi, x))
    z_hi = alpha * x + sigma * noise
    z_lo = ddim_step(self.denoiser.predict_with_guidance(teacher, z_hi, logsnr_hi, label, w),
                     logsnr_lo)
    return z_hi, jax.lax.stop_gradient(z_lo), hi, lo

  def loss(self, params, target, teacher, batch, rng):
    rng_noise, rng_n = jax.random.split(rng)
    x = batch["x"]
    label = batch["label"] if self.denoiser.num_classes else None
    n = jax.random.randint(rng_n, (x.shape[0],), 0, self.num_points - 1)
    w = training_guidance(rng, x.shape[0], self.guidance_range)
    z_hi, z_lo, hi, lo = self.pair(teacher, x, jax.random.normal(rng_noise, x.shape, x.dtype), n,
                                   label, w)
    f_target = jax.lax.stop_gradient(self.f(target, z_lo, lo, label, w))
    return jnp.mean((self.f(params, z_hi, hi, label, w) - f_target) ** 2), {}

  def train_step(self, state, batch, rng, frozen, stage):
    new_student, metrics = state_lib.descend(state.student, self.loss,
                                             (state.target, frozen.teacher, batch, rng),
                                             self.optimizer, self.optim, self.num_steps)
    mu = self.target_decay
    target = jax.tree.map(lambda t, p: mu * t + (1.0 - mu) * p, state.target, new_student.params)
    return CDState(step=state.step + 1, student=new_student, target=target), metrics

  def eval_params(self, state, frozen=None):
    return state.student.ema_params
