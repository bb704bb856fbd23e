"""Loss weightings, all written as w(logsnr) * ||x_hat - x||^2 (per example).

With SNR = exp(logsnr):  ||eps_hat - eps||^2 = SNR ||x_hat - x||^2  and
||v_hat - v||^2 = (1 + SNR) ||x_hat - x||^2, so every weighting is a weight on the x-MSE. On the
rectified-flow path x_hat - x = -tau (v_hat - v) for its velocity v = eps - x, and
tau = 1 / (1 + SNR^(1/2)): its v-MSE is (1 + SNR^(1/2))^2 ||x_hat - x||^2 ('flow_v_mse').
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

WEIGHTINGS = ("eps_mse", "x_mse", "v_mse", "snr_trunc", "min_snr", "flow_v_mse")


def x_mse_weight(weighting: str, logsnr, min_snr_gamma: float = 5.0):
  snr = jnp.exp(logsnr)
  if weighting == "eps_mse":
    return snr
  if weighting == "x_mse":
    return jnp.ones_like(snr)
  if weighting == "v_mse":
    return 1.0 + snr
  if weighting == "snr_trunc":            # max(x-MSE, eps-MSE): the progressive paper's default
    return jnp.maximum(snr, 1.0)
  if weighting == "min_snr":              # min-SNR-gamma (Hang et al. 2023)
    return jnp.minimum(snr, min_snr_gamma)
  if weighting == "flow_v_mse":           # 1 / tau^2: rectified flow's velocity MSE
    return jnp.square(1.0 + jnp.exp(0.5 * logsnr))
  raise ValueError(f"loss weighting: unknown {weighting!r}; choose one of {WEIGHTINGS}")


def per_example_mse(a, b):
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def per_example_huber(error, delta: float):
  """mean(huber_delta(error)), scaled to equal mean(error^2) where |error| <= delta."""
  abs_error = jnp.abs(error)
  huber = jnp.where(abs_error <= delta, jnp.square(error), 2.0 * delta * abs_error - delta**2)
  return jnp.mean(huber, axis=tuple(range(1, error.ndim)))


def weighted_x_loss(x_hat, x_target, logsnr, weighting: str, min_snr_gamma: float = 5.0,
                    huber_delta: Optional[float] = None):
  """Per-example w(logsnr) * mean((x_hat - x_target)^2); with `huber_delta`, the Huber loss of the
  weighted error sqrt(w) (x_hat - x_target) instead (for v_mse, flow_v_mse: of v_hat - v_target)."""
  weight = x_mse_weight(weighting, logsnr, min_snr_gamma)
  if huber_delta is None:
    return weight * per_example_mse(x_hat, x_target)
  scale = jnp.sqrt(weight).reshape(weight.shape + (1,) * (x_hat.ndim - weight.ndim))
  return per_example_huber(scale * (x_hat - x_target), huber_delta)
