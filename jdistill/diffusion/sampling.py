"""Samplers: the deterministic DDIM step, an N-step DDIM sampler with N traced, and DDPM ancestral.

Time runs on a grid 0 = t_0 < t_1 < ... < t_N = 1, by default the uniform t_i = i / N; step i goes
t_{i+1} -> t_i. A non-uniform grid (progressive distillation's nested grids) is a traced array,
padded to a fixed length so one compilation serves every grid.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.parameterization import Prediction, broadcast_to_data, clip_x0
from jdistill.diffusion.schedules import alpha_sigma

# predict_fn(z_t, logsnr_t) -> Prediction; everything else (params, labels, guidance) is closed over.
PredictFn = Callable[[jnp.ndarray, jnp.ndarray], Prediction]


def ddim_step(pred: Prediction, logsnr_s):
  """Deterministic DDIM: z_s = alpha_s x_hat + sigma_s eps_hat."""
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, pred.x0))
  return alpha_s * pred.x0 + sigma_s * pred.eps


def ancestral_step(pred: Prediction, z_t, logsnr_t, logsnr_s, noise):
  """DDPM ancestral step: a draw from the posterior q(z_s | z_t, x = x_hat).

  alpha_{t|s} = alpha_t / alpha_s,  sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2,
  mean = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 x_hat,
  var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
  """
  alpha_t, sigma_t = alpha_sigma(broadcast_to_data(logsnr_t, z_t))
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, z_t))
  alpha_ts = alpha_t / alpha_s
  var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
  mean = (alpha_ts * sigma_s**2 * z_t + alpha_s * var_ts * pred.x0) / sigma_t**2
  std = jnp.sqrt(jnp.maximum(var_ts * sigma_s**2 / sigma_t**2, 0.0))
  return mean + std * noise


def ddim_segment(predict_fn: PredictFn, schedule, z_t, t, s, substeps):
  """`substeps` (may be traced) deterministic DDIM steps from (z_t, t) to s (per example).

  Returns (z_s, x prediction of the last step)."""
  def body(j, carry):
    z, _ = carry
    t_j = t - (t - s) * j / substeps
    t_next = t - (t - s) * (j + 1) / substeps
    pred = predict_fn(z, schedule(t_j))
    return ddim_step(pred, schedule(t_next)), pred.x0
  return jax.lax.fori_loop(0, substeps, body, (z_t, jnp.zeros_like(z_t)))


def ode_states(predict_fn: PredictFn, schedule, noise, points: int, substeps: int):
  """The deterministic DDIM ODE from z_1 = `noise`, kept at t = m / `points` for m = points..0
  (`substeps` steps between points): (B, points + 1, ...), [:, 0] the noise and [:, -1] the last
  x prediction (the sampler's sample). The teacher couplings of DMD's regression and reflow."""
  states, z = [noise], noise
  for m in range(points, 0, -1):
    t, s = jnp.full(z.shape[:1], m / points), jnp.full(z.shape[:1], (m - 1) / points)
    z, x = ddim_segment(predict_fn, schedule, z, t, s, substeps)
    states.append(z if m > 1 else x)
  return jnp.stack(states, axis=1)


def teacher_couplings(denoiser, schedule, params, data_shape, num: int, seed: int, points: int,
                      substeps: int, guidance: float = 0.0, batch_size: int = 500):
  """`num` (noise, the teacher's ODE) couplings from fixed noise: {label, trajectory}, trajectory
  = `ode_states` of the teacher (guided if conditional, at `guidance`: one w, or one per coupling;
  labels drawn uniformly) at `points` + 1 times, [:, 0] the noise and [:, -1] the teacher's
  sample."""
  rng = jax.random.key(seed)
  noise = jax.random.normal(rng, (num, *data_shape))
  conditional = bool(denoiser.num_classes)
  label = (jax.random.randint(jax.random.fold_in(rng, 1), (num,), 0, denoiser.num_classes)
           if conditional else jnp.zeros((num,), jnp.int32))
  guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (num,))

  @jax.jit
  def ode(z, y, w):
    predict = lambda z_, logsnr: denoiser.predict_guided(params, z_, logsnr,
                                                         y if conditional else None, w)
    return ode_states(predict, schedule, z, points, substeps)
  trajectory = jnp.concatenate([ode(*(a[i:i + batch_size] for a in (noise, label, guidance)))
                                for i in range(0, num, batch_size)])
  return {"label": label, "trajectory": trajectory}


def ddim_chain(predict_fn: PredictFn, schedule, z, grid, start, stop, max_steps):
  """Deterministic DDIM steps from `grid[start]` down to `grid[stop]` through every grid point
  between (`start`, `stop`: per-example indices; `max_steps` >= start - stop, may be traced).

  Returns (z at grid[stop], x prediction of the last step)."""
  def body(j, carry):
    z, x = carry
    active = broadcast_to_data(start - j > stop, z)
    k = jnp.maximum(start - j, 1)
    pred = predict_fn(z, schedule(grid[k]))
    z_next = ddim_step(pred, schedule(grid[k - 1]))
    return jnp.where(active, z_next, z), jnp.where(active, pred.x0, x)
  return jax.lax.fori_loop(0, max_steps, body, (z, jnp.zeros_like(z)))


GRID_LENGTH = 1025        # grids of up to 1024 steps share one shape, so one compilation


def padded_grid(grid, num_steps: int, length: int = GRID_LENGTH):
  """A sampling grid 0 = t_0 < ... < t_N = 1 (N = `num_steps`) as float32, padded with 1.0 to at
  least `length` points; ValueError naming what is wrong otherwise."""
  grid = np.asarray(grid, np.float64)
  if grid.shape != (num_steps + 1,):
    raise ValueError(f"sampling grid: {num_steps} steps need {num_steps + 1} time points, got "
                     f"shape {grid.shape}")
  if grid[0] != 0.0 or grid[-1] != 1.0 or np.any(np.diff(grid) <= 0):
    raise ValueError(f"sampling grid: must rise strictly from 0 to 1, got {grid.tolist()}")
  return np.concatenate([grid, np.ones(max(0, length - len(grid)))]).astype(np.float32)


def ddim_x_target(z_t, z_s, x_at_end, logsnr_t, logsnr_s, s):
  """The x that takes one DDIM step z_t -> z_s exactly; `x_at_end` where s = 0:

    x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
  alpha_t, sigma_t = alpha_sigma(broadcast_to_data(logsnr_t, z_t))
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, z_t))
  ratio = sigma_s / sigma_t
  x_target = (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)
  return jnp.where(broadcast_to_data(s, z_t) == 0.0, x_at_end, x_target)


MODES = ("ddim", "euler", "ancestral", "renoise", "flowmap")  # 'euler' on a flow's velocity is DDIM
STOCHASTIC = ("ancestral", "renoise")


def renoise_step(pred: Prediction, logsnr_s, noise):
  """Few-step generators (DMD2, consistency-style): z_s = alpha_s x_hat + sigma_s * fresh noise."""
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, pred.x0))
  return alpha_s * pred.x0 + sigma_s * noise


def sample(predict_fn: PredictFn, schedule, noise, num_steps, *, clip_x: bool = True,
           rng: Optional[jax.Array] = None, mode: Optional[str] = None, grid=None):
  """Integrates from z_1 = noise to x in `num_steps` steps.

  `num_steps` may be a traced int: the loop is a `lax.fori_loop` with a dynamic trip count, so
  one compilation serves every step count. `grid`: the time points t_0 = 0 < ... < t_N = 1 (an
  array, may be traced and padded past N; `padded_grid`), default the uniform t_i = i / N. `mode`:
  'ddim' (deterministic; the default without `rng`), 'euler' (the same step: on the flow path
  z_s = z_t + (tau_s - tau_t) v_hat is exactly DDIM's), 'ancestral' (DDPM; the default with
  `rng`), 'renoise' (x_hat re-noised with fresh noise) or 'flowmap' (a flow map told where each
  step lands: `predict_fn(z, logsnr_t, logsnr_s)`; its Prediction at (t, s) holds the average
  velocity u = eps - x over [s, t], so DDIM's step is the flow map's z_s = z_t + (tau_s - tau_t) u
  and x = z_t - tau_t u(z, 0, t) at the last; `clip_x` clips only that sample). The last step
  returns the x prediction itself (at s = 0, z_s = x_hat).
  """
  mode = mode or ("ddim" if rng is None else "ancestral")
  if mode not in MODES:
    raise ValueError(f"sampling mode: unknown {mode!r}; choose one of {MODES}")
  if mode in STOCHASTIC and rng is None:
    raise ValueError(f"sampling mode {mode!r} needs an rng")
  num_steps = jnp.asarray(num_steps, jnp.int32)
  grid = None if grid is None else jnp.asarray(grid, jnp.float32)
  batch = noise.shape[0]

  def body(i, z):
    if grid is None:
      t = (num_steps - i).astype(jnp.float32) / num_steps
      s = (num_steps - i - 1).astype(jnp.float32) / num_steps
    else:
      t, s = grid[num_steps - i], grid[num_steps - i - 1]
    logsnr_t = jnp.full((batch,), schedule(t))
    logsnr_s = jnp.full((batch,), schedule(s))
    if mode == "flowmap":
      pred = predict_fn(z, logsnr_t, logsnr_s)
    else:
      pred = predict_fn(z, logsnr_t)
      if clip_x:
        pred = clip_x0(pred, z, logsnr_t)
    if mode not in STOCHASTIC:
      z_next = ddim_step(pred, logsnr_s)
    else:
      step_noise = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
      if mode == "ancestral":
        z_next = ancestral_step(pred, z, logsnr_t, logsnr_s, step_noise)
      else:
        z_next = renoise_step(pred, logsnr_s, step_noise)
    x = jnp.clip(pred.x0, -1.0, 1.0) if clip_x else pred.x0
    return jnp.where(i == num_steps - 1, x, z_next)

  return jax.lax.fori_loop(0, num_steps, body, noise)
