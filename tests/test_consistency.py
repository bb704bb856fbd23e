"""Consistency distillation: the sCD tangent on the exact Gaussian denoiser against its hand
derivation, CD's target against one DDIM (= Euler) step by hand and its boundary condition, the
2-step sampler's middle, config validation and tiny runs of both variants."""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jdistill.diffusion import schedules
from jdistill.diffusion.parameterization import Prediction, from_x0
from jdistill.errors import ConfigError
from jdistill.methods import consistency as consistency_method
from jdistill.models.denoiser import Denoiser
from jdistill.objectives.consistency import (CDObjective, SCDObjective, consistency_function,
                                             karras_sigmas, proposal_logsnr, scd_tangent)

MU, S = 0.3, 0.7           # data x ~ N(MU, S^2 I)


def exact_x0(z, logsnr):
  """E[x | z] for z = alpha x + sigma eps: MU + k (z - alpha MU), k = alpha S^2 / (alpha^2 S^2 + sigma^2)."""
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None])
  return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)


def exact_v(z, logsnr) -> Prediction:
  return from_x0(exact_x0(z, logsnr), z, logsnr).v


def test_scd_tangent_on_the_exact_gaussian_denoiser_equals_its_hand_derivation():
  """Teacher F = the exact v, student F = v + c. With angle t (alpha = cos t, sigma = sin t),
  x0 = MU + k (z - alpha MU), D = alpha^2 S^2 + sigma^2, along the ODE dz/dt = v:
    dx0/dt = k' (z - alpha MU) + k (v + sigma MU),   k' = -S^2 sigma (D + 2 alpha^2 (1 - S^2)) / D^2,
    g = -alpha^2 c + r alpha dx0/dt,   then g / (||g|| + 0.1)."""
  c, r = 0.05, 0.5
  z = jax.random.normal(jax.random.key(0), (6, 2))
  logsnr = jnp.array([-4.0, -2.0, -0.5, 0.5, 2.0, 4.0])
  teacher_v = exact_v(z, logsnr)
  g, raw, f_minus = scd_tangent(lambda z_, l_: exact_v(z_, l_) + c, teacher_v, z, logsnr, r, 0.1)
  alpha, sigma = (np.asarray(a, np.float64) for a in schedules.alpha_sigma(logsnr[:, None]))
  zz, v = np.asarray(z, np.float64), np.asarray(teacher_v, np.float64)
  d = alpha**2 * S**2 + sigma**2
  k = alpha * S**2 / d
  k_prime = -S**2 * sigma * (d + 2 * alpha**2 * (1 - S**2)) / d**2
  dx0_dt = k_prime * (zz - alpha * MU) + k * (v + sigma * MU)
  hand = -alpha**2 * c + r * alpha * dx0_dt
  np.testing.assert_allclose(raw, hand, atol=1e-5)
  np.testing.assert_allclose(g, hand / (np.linalg.norm(hand, axis=1, keepdims=True) + 0.1),
                             atol=1e-5)
  np.testing.assert_allclose(f_minus, v + c, atol=1e-6)
  assert np.min(np.abs(hand)) > 1e-3


class ExactGaussianX(nn.Module):
  """An 'x' model (time input logSNR) that is the exact E[x | z] of the Gaussian data."""
  @nn.compact
  def __call__(self, z, logsnr, label=None, train=False):
    self.param("unused", nn.initializers.zeros, ())
    return exact_x0(z, logsnr)


def test_cd_target_is_one_teacher_ddim_step_and_f_meets_the_boundary():
  """x_{n+1} = x + sigma_{n+1} eps; the teacher's DDIM step to sigma_n is Euler in EDM's x:
  x_n = x_{n+1} + (sigma_n - sigma_{n+1}) (x_{n+1} - x0) / sigma_{n+1}, z_n = x_n / sqrt(1 + sigma_n^2).
  f(., sigma_min) is the EDM state itself, whatever the network says."""
  schedule = schedules.make_schedule(ml_collections.ConfigDict(dict(name="cosine")))
  objective = CDObjective(Denoiser(ExactGaussianX(), "x"), schedule, optax.sgd(0.0), None, 10, (2,),
                          num_points=5, sigma_min=0.002, sigma_max=80.0)
  sigmas = karras_sigmas(5, 0.002, 80.0)
  np.testing.assert_allclose([sigmas[0], sigmas[-1]], [0.002, 80.0], rtol=1e-12)
  rng = jax.random.key(0)
  x = MU + S * jax.random.normal(rng, (4, 2))
  noise = jax.random.normal(jax.random.fold_in(rng, 1), (4, 2))
  n = jnp.array([0, 1, 2, 3])
  teacher = {"unused": jnp.zeros(())}
  z_hi, z_lo, hi, lo = objective.pair(teacher, x, noise, n, None)
  hi_, lo_ = sigmas[np.asarray(n) + 1][:, None], sigmas[np.asarray(n)][:, None]
  x_hi = np.asarray(x, np.float64) + hi_ * np.asarray(noise, np.float64)
  np.testing.assert_allclose(z_hi, x_hi / np.sqrt(1 + hi_**2), rtol=1e-5, atol=1e-6)
  x0 = np.asarray(exact_x0(z_hi, -2.0 * jnp.log(hi)), np.float64)
  x_lo = x_hi + (lo_ - hi_) * (x_hi - x0) / hi_
  np.testing.assert_allclose(z_lo, x_lo / np.sqrt(1 + lo_**2), rtol=1e-4, atol=1e-5)
  # boundary: f(z, sigma_min) = z / alpha; above it f is the network's x0 up to O(sigma_min / sigma)
  z = jax.random.normal(rng, (3, 2))
  anything = jnp.full((3, 2), 5.0)
  np.testing.assert_allclose(consistency_function(anything, z, jnp.full((3,), 0.002), 0.002),
                             z * np.sqrt(1 + 0.002**2), rtol=1e-6)
  far = consistency_function(anything, z, jnp.full((3,), 50.0), 0.002)
  np.testing.assert_allclose(far, anything, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["cosine", "flow"])
def test_two_step_middle_is_the_papers_noise_level(name):
  """The 2-step grid's middle t has logsnr = -2 log(0.5 tan 1.1) (sCM's t = 1.1 at sigma_d = 0.5)."""
  config = consistency_method.get_config("digits")
  schedule = schedules.make_schedule(ml_collections.ConfigDict(dict(name=name, shift=1.0)))
  grid = consistency_method.sampling_grids(config, schedule)[2]
  assert grid[0] == 0.0 and grid[2] == 1.0
  np.testing.assert_allclose(float(schedule(grid[1])), -2.0 * math.log(0.5 * math.tan(1.1)),
                             atol=1e-4)


@pytest.mark.parametrize("field,value", [("variant", "ict"), ("p_std", 0.0), ("tangent_c", 0.0),
                                         ("warmup_steps", -1), ("num_points", 1),
                                         ("sigma_min", 0.0), ("sigma_max", 0.001),
                                         ("target_decay", 1.0), ("mid_sigma", 0.0),
                                         ("eval_steps", (1, 4))])
def test_invalid_consistency_field_is_named(field, value):
  config = consistency_method.get_config()
  consistency_method.validate(config)
  config.consistency[field] = value
  with pytest.raises(ConfigError, match=f"config.consistency.{field}"):
    consistency_method.validate(config)


@pytest.mark.parametrize("preset,label", [("digits", "sCD"), ("cd", "CD")])
def test_consistency_trains_exports_and_reports(tmp_path, preset, label):
  """Tiny runs of sCD and CD from a random tiny teacher: they train, log (sCD: the tangent norm and
  weight range), export a re-noising sampler on the 2-step grid's first count and write the summary."""
  from conftest import tiny_teacher_params, tiny_unet
  from test_meanflow import logged_tags
  from jdistill import methods
  from jdistill.train import teachers
  config = tiny_unet(consistency_method.get_config(preset))
  config.data.batch_size = 8
  config.teacher.update(sampling_steps=2, checkpoint=str(tmp_path / "teacher.msgpack"))
  config.train.update(num_steps=3, log_every=1, save_every=100, eval_every=0)
  config.eval.update(num_samples=16, neighbour_examples=50, batch_size=16)
  teachers.export(tiny_teacher_params(config, 0), config, config.teacher.checkpoint,
                  {"mode": "ddim", "steps": 2})
  run = tmp_path / "consistency"
  methods.train(config, str(run))
  summary = (run / "summary.md").read_text()
  assert f"| {label} | 1 |" in summary and f"| {label} | 2 |" in summary
  exported = json.loads((run / "student.json").read_text())
  assert exported["sampling"]["mode"] == "renoise" and exported["sampling"]["steps"] == 1
  tags = logged_tags(run)
  assert "loss" in tags
  if label == "sCD":
    assert {"tangent_norm", "tangent_norm_max", "weight_min", "weight_max"} <= tags


def test_a_guidance_conditioned_scd_student_is_pulled_towards_the_cfg_teacher_at_its_w():
  """sCD with student_guidance, at the start (the student is the conditional teacher at every w,
  tangent warm-up r = 0): g = -alpha^2 (F- - dx/dt) with dx/dt the two-pass CFG velocity at the
  example's w, so g = -alpha^2 w (v(z, null) - v(z, c)) by hand, and the loss's mse is the
  normalised g's mean square."""
  from conftest import tiny_teacher_params, tiny_unet
  from jdistill import config as config_lib
  from jdistill.models.denoiser import make_denoiser
  from jdistill.objectives.guided import draw_guidance
  config = tiny_unet(config_lib.base_config("digits_cond"))
  denoiser = make_denoiser(config.model, (8, 8, 1), config.diffusion.parameterization)
  teacher = tiny_teacher_params(config, 0)
  objective = SCDObjective(denoiser, schedules.make_schedule(config.diffusion.schedule),
                           optax.sgd(0.0), config.optim, 10, (8, 8, 1), guidance_range=(0.0, 4.0))
  state = objective.new_state(teacher)
  rng = jax.random.key(3)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
  label = jnp.arange(6) % 10
  _, metrics = objective.loss(state.params, teacher, {"x": x, "label": label}, rng, 0.0)
  rng_noise, rng_time = jax.random.split(rng)
  logsnr = proposal_logsnr(rng_time, 6, objective.p_mean, objective.p_std)
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None])
  z = alpha * x + sigma * jax.random.normal(rng_noise, x.shape)
  w = draw_guidance(jax.random.fold_in(rng, 11), 6, (0.0, 4.0))
  v_c = denoiser.predict(teacher, z, logsnr, label).v
  v_null = denoiser.predict(teacher, z, logsnr, jnp.full((6,), 10)).v
  g = -(alpha**2) * w[:, None, None, None] * (v_null - v_c)
  g = g / (jnp.sqrt(jnp.sum(g**2, axis=(1, 2, 3), keepdims=True)) + objective.tangent_c)
  np.testing.assert_allclose(metrics["mse"], jnp.mean(g**2), rtol=2e-4)
  assert float(jnp.mean(g**2)) > 1e-4                     # w > 0 pulls the student
