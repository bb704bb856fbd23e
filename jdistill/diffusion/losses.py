"""Loss weightings, all written as w(logsnr) * ||x_hat - x||^2 (per example).

With SNR = exp(logsnr):  ||eps_hat - eps||^2 = SNR ||x_hat - x||^2  and
||v_hat - v||^2 = (1 + SNR) ||x_hat - x||^2, so every weighting is a weight on the x-MSE.
"""
from __future__ import annotations

import jax.numpy as jnp

WEIGHTINGS = ("eps_mse", "x_mse", "v_mse", "snr_trunc", "min_snr")


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
  raise ValueError(f"loss weighting: unknown {weighting!r}; choose one of {WEIGHTINGS}")


def per_example_mse(a, b):
  return jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))


def weighted_x_loss(x_hat, x_target, logsnr, weighting: str, min_snr_gamma: float = 5.0):
  """Per-example w(logsnr) * mean((x_hat - x_target)^2)."""
  return x_mse_weight(weighting, logsnr, min_snr_gamma) * per_example_mse(x_hat, x_target)
