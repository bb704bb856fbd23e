"""Samplers: the deterministic DDIM step, an N-step DDIM sampler with N traced, and DDPM ancestral.

Time runs on the uniform grid t_i = i / N; step i goes t = (i+1)/N -> s = i/N.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

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


def ddim_x_target(z_t, z_s, x_at_end, logsnr_t, logsnr_s, s):
  """The x that takes one DDIM step z_t -> z_s exactly; `x_at_end` where s = 0:

    x = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)."""
  alpha_t, sigma_t = alpha_sigma(broadcast_to_data(logsnr_t, z_t))
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, z_t))
  ratio = sigma_s / sigma_t
  x_target = (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)
  return jnp.where(broadcast_to_data(s, z_t) == 0.0, x_at_end, x_target)


MODES = ("ddim", "ancestral", "renoise")


def renoise_step(pred: Prediction, logsnr_s, noise):
  """Few-step generators (DMD2, consistency-style): z_s = alpha_s x_hat + sigma_s * fresh noise."""
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, pred.x0))
  return alpha_s * pred.x0 + sigma_s * noise


def sample(predict_fn: PredictFn, schedule, noise, num_steps, *, clip_x: bool = True,
           rng: Optional[jax.Array] = None, mode: Optional[str] = None):
  """Integrates from z_1 = noise to x in `num_steps` steps.

  `num_steps` may be a traced int: the loop is a `lax.fori_loop` with a dynamic trip count, so
  one compilation serves every step count. `mode`: 'ddim' (deterministic; the default without
  `rng`), 'ancestral' (DDPM; the default with `rng`) or 'renoise' (x_hat re-noised with fresh
  noise). The last step returns the x prediction itself (at s = 0, z_s = x_hat).
  """
  mode = mode or ("ddim" if rng is None else "ancestral")
  if mode not in MODES:
    raise ValueError(f"sampling mode: unknown {mode!r}; choose one of {MODES}")
  if mode != "ddim" and rng is None:
    raise ValueError(f"sampling mode {mode!r} needs an rng")
  num_steps = jnp.asarray(num_steps, jnp.int32)
  batch = noise.shape[0]

  def body(i, z):
    t = (num_steps - i).astype(jnp.float32) / num_steps
    s = (num_steps - i - 1).astype(jnp.float32) / num_steps
    logsnr_t = jnp.full((batch,), schedule(t))
    logsnr_s = jnp.full((batch,), schedule(s))
    pred = predict_fn(z, logsnr_t)
    if clip_x:
      pred = clip_x0(pred, z, logsnr_t)
    if mode == "ddim":
      z_next = ddim_step(pred, logsnr_s)
    else:
      step_noise = jax.random.normal(jax.random.fold_in(rng, i), z.shape, z.dtype)
      if mode == "ancestral":
        z_next = ancestral_step(pred, z, logsnr_t, logsnr_s, step_noise)
      else:
        z_next = renoise_step(pred, logsnr_s, step_noise)
    return jnp.where(i == num_steps - 1, pred.x0, z_next)

  return jax.lax.fori_loop(0, num_steps, body, noise)
