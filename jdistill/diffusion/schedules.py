"""Noise schedules as logSNR functions of continuous time t in [0, 1].

The forward process is z_t = alpha_t x + sigma_t eps with alpha_t^2 = sigmoid(logsnr_t) and
sigma_t^2 = sigmoid(-logsnr_t) (variance preserving). t = 0 is (nearly) clean data, t = 1 is
(nearly) pure noise.

The 'flow' schedule is rectified flow's path z = (1 - tau) x + tau eps (SD3, Flux): the same
logSNR(tau) = 2 log((1 - tau) / tau) on z rescaled by 1 / (alpha + sigma). Its time is shifted,
tau = s t / (1 + (s - 1) t), so the shift reaches training, every sampling grid and every
method's noise-level draws. Its models see the path's own z and tau (models/denoiser.py).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdistill.errors import check_choice

LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0
SCHEDULES = ("cosine", "linear", "scaled_linear", "flow")
PATHS = ("vp", "flow")


def path_of(config) -> str:
  """'flow' for the rectified-flow schedule, else 'vp': the coordinates its models work in."""
  return "flow" if config["name"] == "flow" else "vp"


def alpha_sigma(logsnr):
  """(alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def cosine_logsnr(t, logsnr_min=LOGSNR_MIN, logsnr_max=LOGSNR_MAX):
  """The cosine schedule of the progressive distillation paper, logSNR clipped to [min, max].

  logsnr(t) = -2 log tan(a t + b), with b, a chosen so logsnr(0) = max and logsnr(1) = min.
  """
  b = np.arctan(np.exp(-0.5 * logsnr_max))
  a = np.arctan(np.exp(-0.5 * logsnr_min)) - b
  return -2.0 * jnp.log(jnp.tan(a * jnp.asarray(t, jnp.float32) + b))


def shift_time(t, shift: float):
  """tau = s t / (1 + (s - 1) t): SD3's time shift (s > 1 spends more time at high noise)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


def unshift_time(tau, shift: float):
  """The inverse of `shift_time`: t = tau / (s - (s - 1) tau)."""
  return tau / (shift - (shift - 1.0) * tau)


def flow_logsnr(t, shift: float = 1.0):
  """logSNR of the rectified-flow path at shifted time tau: 2 log((1 - tau) / tau), clipped."""
  tau = shift_time(jnp.asarray(t, jnp.float32), shift)
  return jnp.clip(2.0 * (jnp.log1p(-tau) - jnp.log(tau)), LOGSNR_MIN, LOGSNR_MAX)


def flow_time(logsnr):
  """The flow path's tau (= its sigma) at `logsnr`: sigmoid(-logsnr / 2)."""
  return jax.nn.sigmoid(-0.5 * logsnr)


def time_of_logsnr(schedule, logsnr: float) -> float:
  """The t in [0, 1] where `schedule` (logSNR falling in t) reaches `logsnr`, by bisection."""
  lo, hi = 0.0, 1.0
  for _ in range(40):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if float(schedule(mid)) > logsnr else (lo, mid)
  return 0.5 * (lo + hi)


def discrete_logsnr_table(name: str, num_train_timesteps: int, beta_start: float, beta_end: float,
                          zero_terminal_snr: bool = False):
  """logSNR at t_k = k / T for k = 0..T of a DDPM beta schedule (k = 0 is clean: logsnr_max).

  These schedules end short of pure noise (Stable Diffusion's betas: alpha_T = 0.068), while
  sampling starts from it. `zero_terminal_snr` rescales sqrt(alpha_bar) (Lin et al. 2024, Alg. 1)
  so that alpha_T = 0 (logSNR clipped to LOGSNR_MIN) and alpha_1 is unchanged.
  """
  if name == "linear":
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
  elif name == "scaled_linear":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
  else:
    raise ValueError(f"schedule.name: unknown discrete schedule {name!r}")
  alphas_cumprod = np.cumprod(1.0 - betas)
  if zero_terminal_snr:
    root = np.sqrt(alphas_cumprod)
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root**2
  with np.errstate(divide="ignore"):
      logsnr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)
  logsnr = np.concatenate([[LOGSNR_MAX], np.clip(logsnr, LOGSNR_MIN, LOGSNR_MAX)])
  return np.linspace(0.0, 1.0, num_train_timesteps + 1), logsnr


def ddpm_table_logsnr(config) -> tuple:
  """logSNR of diffusers' alphas_cumprod[k], k = 0..T-1, of a DDPM schedule config (decreasing)."""
  _, logsnr = discrete_logsnr_table(config["name"], config["num_train_timesteps"],
                                    config["beta_start"], config["beta_end"],
                                    config.get("zero_terminal_snr", False))
  return tuple(float(v) for v in logsnr[1:])


def ddpm_timestep(logsnr, table_logsnr):
  """The continuous DDPM timestep tau in [0, T-1] whose alphas_cumprod has `logsnr`: the inverse
  of the table (`ddpm_table_logsnr`; tau = t T - 1), by linear interpolation, clamped at its ends."""
  table = jnp.asarray(table_logsnr, jnp.float32)
  return jnp.interp(-logsnr, -table, jnp.arange(table.shape[0], dtype=jnp.float32))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A named logSNR schedule: `schedule.logsnr(t)` for t in [0, 1] (any shape, traced or not)."""
  name: str
  logsnr: Callable

  def __call__(self, t):
    return self.logsnr(t)


def defining_fields(config) -> dict:
  """The fields of a schedule config that change its logSNR(t): the cosine schedule is its name."""
  if config["name"] == "cosine":
    return {"name": "cosine"}
  if config["name"] == "flow":
    return {"name": "flow", "shift": config.get("shift", 1.0)}
  return {"name": config["name"], "num_train_timesteps": config["num_train_timesteps"],
          "beta_start": config["beta_start"], "beta_end": config["beta_end"],
          "zero_terminal_snr": config.get("zero_terminal_snr", False)}


def make_schedule(config) -> Schedule:
  """Builds the schedule named by `config.name` ('cosine', 'linear', 'scaled_linear', 'flow')."""
  name = config.name
  check_choice("diffusion.schedule.name", name, SCHEDULES)
  if name == "cosine":
    return Schedule("cosine", cosine_logsnr)
  if name == "flow":
    shift = float(config.get("shift", 1.0))
    return Schedule("flow", lambda t: flow_logsnr(t, shift))
  t_grid, logsnr_grid = discrete_logsnr_table(                  # 'linear', 'scaled_linear'
      name, config.num_train_timesteps, config.beta_start, config.beta_end,
      config.get("zero_terminal_snr", False))
  t_grid = jnp.asarray(t_grid, jnp.float32)
  logsnr_grid = jnp.asarray(logsnr_grid, jnp.float32)
  return Schedule(name, lambda t: jnp.interp(jnp.asarray(t, jnp.float32), t_grid, logsnr_grid))
