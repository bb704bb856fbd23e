"""Model output <-> Prediction(x0, eps, v), for the eps, x, v and 'both' parameterizations.

With z = alpha x + sigma eps (alpha^2 + sigma^2 = 1) and v = alpha eps - sigma x:
  x = alpha z - sigma v,   eps = sigma z + alpha v.

A Prediction is always of the variance-preserving z. A model of the rectified-flow path (its
`path` is 'flow') sees z_flow = (1 - tau) x + tau eps = z / (alpha + sigma), and its 'v' is the
flow velocity dz_flow/dtau = eps - x:  x = z_flow - tau v,  eps = z_flow + (1 - tau) v. Its 'x'
and 'eps' outputs mean what they mean on the VP path.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jdistill.diffusion.schedules import alpha_sigma, flow_time

PARAMETERIZATIONS = ("eps", "x", "v", "both")


class Prediction(NamedTuple):
  """A denoiser's prediction in all three forms, always consistent with z_t."""
  x0: jnp.ndarray
  eps: jnp.ndarray
  v: jnp.ndarray


def output_channels(parameterization: str, data_channels: int) -> int:
  return 2 * data_channels if parameterization == "both" else data_channels


def broadcast_to_data(scalar_per_example, like):
  """Reshapes a (B,) array to (B, 1, ..., 1) so it broadcasts against data `like`."""
  return jnp.reshape(scalar_per_example, scalar_per_example.shape + (1,) * (like.ndim - 1))


def forward_process(x, t, eps, schedule):
  """z_t = alpha_t x + sigma_t eps; returns (z_t, logsnr_t)."""
  logsnr = schedule(t)
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, x))
  return alpha * x + sigma * eps, logsnr


def from_x0(x0, z, logsnr):
  """Prediction from an x estimate: eps = (z - alpha x) / sigma."""
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  eps = (z - alpha * x0) / sigma
  return Prediction(x0=x0, eps=eps, v=alpha * eps - sigma * x0)


def from_eps(eps, z, logsnr):
  """Prediction from an eps estimate: x = (z - sigma eps) / alpha."""
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  x0 = (z - sigma * eps) / alpha
  return Prediction(x0=x0, eps=eps, v=alpha * eps - sigma * x0)


def from_v(v, z, logsnr):
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  return Prediction(x0=alpha * z - sigma * v, eps=sigma * z + alpha * v, v=v)


def path_state(z, logsnr, path: str = "vp"):
  """The state a model of `path` sees: z itself ('vp'), or z_flow = z / (alpha + sigma)."""
  if path == "vp":
    return z
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  return z / (alpha + sigma)


def from_flow_v(v, z, logsnr):
  """Prediction from a flow velocity v = eps - x of the state z_flow (z: VP)."""
  z_flow = path_state(z, logsnr, "flow")
  tau = flow_time(broadcast_to_data(logsnr, z))
  x0, eps = z_flow - tau * v, z_flow + (1.0 - tau) * v
  alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
  return Prediction(x0=x0, eps=eps, v=alpha * eps - sigma * x0)


def path_velocity(pred: Prediction, path: str = "vp"):
  """The 'v' a model of `path` outputs for `pred`: the VP v, or the flow velocity eps - x."""
  return pred.v if path == "vp" else pred.eps - pred.x0


def from_model_output(parameterization: str, output, z, logsnr, path: str = "vp") -> Prediction:
  """Converts a network's raw output to a Prediction (`path`: the model's coordinates; only its
  'v' differs between paths).

  'both' (progressive distillation paper): the net outputs x~ and eps~; the x estimate is
  x = sigma^2 x~ + alpha^2 (z - sigma eps~) / alpha, stable at both ends of the schedule.
  """
  output = output.astype(jnp.float32)
  if parameterization == "eps":
    return from_eps(output, z, logsnr)
  if parameterization == "x":
    return from_x0(output, z, logsnr)
  if parameterization == "v":
    return from_v(output, z, logsnr) if path == "vp" else from_flow_v(output, z, logsnr)
  if parameterization == "both":
    x_tilde, eps_tilde = jnp.split(output, 2, axis=-1)
    alpha, sigma = alpha_sigma(broadcast_to_data(logsnr, z))
    x0 = sigma**2 * x_tilde + alpha * (z - sigma * eps_tilde)
    return from_x0(x0, z, logsnr)
  raise ValueError(f"parameterization: unknown {parameterization!r}; choose one of {PARAMETERIZATIONS}")


def clip_x0(pred: Prediction, z, logsnr) -> Prediction:
  """Clips x to [-1, 1] and recomputes eps and v to stay consistent with z."""
  return from_x0(jnp.clip(pred.x0, -1.0, 1.0), z, logsnr)


def combine(weights_and_predictions) -> Prediction:
  """sum_i w_i * pred_i, field by field (linear for a fixed z, so the result stays consistent)."""
  fields = []
  for name in Prediction._fields:
    fields.append(sum(w * getattr(p, name) for w, p in weights_and_predictions))
  return Prediction(*fields)
