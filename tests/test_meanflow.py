"""MeanFlow: the flow-map student starts as the teacher, its JVP against finite differences, the
identity's target against the closed-form average velocity of Gaussian data, the 'flowmap' sampler
on the exact flow map, config validation and a tiny run end to end."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jdistill.diffusion import schedules
from jdistill.errors import ConfigError
from jdistill.eval.evaluate import Sampler
from jdistill.methods import meanflow as meanflow_method
from jdistill.models.denoiser import Denoiser, make_denoiser, with_interval_embedding
from jdistill.objectives.meanflow import MeanFlowObjective

MU, S = 0.4, 0.6           # data x ~ N(MU, S^2 I)


def gaussian_flow(z, r, t):
  """The exact flow of x ~ N(MU, S^2) on z_t = (1 - t) x + t e: z_t has mean m_t = (1 - t) MU and
  std s_t = sqrt((1 - t)^2 S^2 + t^2), and the ODE keeps (z - m) / s fixed, so the flow map is
  z_r = m_r + s_r / s_t (z - m_t), and the average velocity u = (z_t - z_r) / (t - r) is
  u = (z - m_t)(s_t - s_r) / ((t - r) s_t) - MU; at r = t the velocity
  v = (z - m_t) s_t' / s_t - MU with s_t' = (t - (1 - t) S^2) / s_t."""
  std = lambda tau: jnp.sqrt((1 - tau) ** 2 * S**2 + tau**2)
  s_t, s_r, h = std(t), std(r), t - r
  safe_h = jnp.where(h > 1e-6, h, 1.0)
  slope = jnp.where(h > 1e-6, (s_t - s_r) / (safe_h * s_t), (t - (1 - t) * S**2) / s_t**2)
  return (z - (1 - t) * MU) * slope - MU


class ExactGaussianFlowMap(nn.Module):
  """A flow-path 'v' model (time input tau) whose output is the exact average velocity
  u(z, tau - h, tau) of the Gaussian data; its 'interval_embedding' param marks it a flow map."""
  @nn.compact
  def __call__(self, z, tau, label=None, train=False, interval=None):
    self.param("interval_embedding", nn.initializers.zeros, ())
    tau = tau[:, None]
    h = jnp.zeros_like(tau) if interval is None else interval[:, None]
    return gaussian_flow(z, tau - h, tau)


def _exact_objective(velocity_source="teacher"):
  denoiser = Denoiser(ExactGaussianFlowMap(), "v", path="flow", time_input="t")
  schedule = schedules.make_schedule(ml_collections.ConfigDict(dict(name="flow", shift=1.0)))
  return MeanFlowObjective(denoiser, schedule, optax.sgd(0.0), None, 10, (3,),
                           velocity_source=velocity_source)


def test_identity_target_equals_the_closed_form_average_velocity_of_gaussian_data():
  """With the exact velocity and the exact flow map as the student, u_tgt = v - (t - r) du/dt
  (du/dt from the one JVP, through the flow -> VP conversions) is the closed-form u(z, r, t)."""
  objective = _exact_objective()
  params = {"interval_embedding": jnp.zeros(())}
  rng = jax.random.key(0)
  x = MU + S * jax.random.normal(rng, (64, 3))
  noise = jax.random.normal(jax.random.fold_in(rng, 1), (64, 3))
  t = jnp.linspace(0.2, 0.9, 64)
  r = t * jnp.linspace(0.0, 0.9, 64)
  u, u_tgt, du_dt, v = objective.identity_terms(params, params, x, noise, r, t, None)
  z = (1 - t[:, None]) * x + t[:, None] * noise
  closed = gaussian_flow(z, r[:, None], t[:, None])
  np.testing.assert_allclose(u, closed, atol=2e-5)
  np.testing.assert_allclose(u_tgt, closed, atol=2e-5)
  np.testing.assert_allclose(v, gaussian_flow(z, t[:, None], t[:, None]), atol=2e-5)
  assert float(jnp.max(jnp.abs(u_tgt - v))) > 0.05          # the correction term matters
  # the data's velocity e - x is v's unbiased draw, not v: its target differs
  _, u_tgt_data, _, v_data = _exact_objective("data").identity_terms(params, params, x, noise, r,
                                                                     t, None)
  np.testing.assert_allclose(v_data, noise - x, atol=1e-6)
  assert float(jnp.max(jnp.abs(u_tgt_data - closed))) > 0.05


@pytest.mark.parametrize("steps", [1, 2])
def test_flowmap_sampler_lands_on_the_exact_flow_map(steps):
  """The evaluator's 'flowmap' mode tells the model each step's interval: with the exact flow map
  one and two steps both give the ODE's x = MU + S (z_1 - m_1) / s_1 (up to tau's clip at the
  ends, 4.5e-5)."""
  objective = _exact_objective()
  sampler = Sampler(objective.denoiser, objective.schedule, (3,), clip_x=False)
  samples = sampler.sample({"interval_embedding": jnp.zeros(())}, steps, 16, seed=3, mode="flowmap")
  noise = np.asarray(jax.random.normal(jax.random.key(3), (16, 3)))
  tau_1 = float(jax.nn.sigmoid(10.0))
  expected = MU + S * (noise - (1 - tau_1) * MU) / np.sqrt((1 - tau_1) ** 2 * S**2 + tau_1**2)
  np.testing.assert_allclose(samples, expected, atol=1e-3)
  # a DDIM sampler of the velocity (the flow map without its interval) is far off in one step
  if steps == 1:
    ddim = sampler.sample({"interval_embedding": jnp.zeros(())}, 1, 16, seed=3, mode="ddim")
    assert np.max(np.abs(ddim - expected)) > 0.1


def _tiny_student(preset="digits"):
  from conftest import tiny_teacher_params, tiny_unet
  config = tiny_unet(meanflow_method.get_config(preset))
  denoiser = make_denoiser(config.model, (8, 8, 1), config.diffusion.parameterization)
  teacher = jax.tree.map(jnp.asarray, tiny_teacher_params(config, 0))
  return denoiser, teacher, with_interval_embedding(denoiser, teacher, jnp.zeros((1, 8, 8, 1)))


def test_a_student_from_the_teacher_is_the_teacher_at_every_interval():
  denoiser, teacher, student = _tiny_student()
  z = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  logsnr = jnp.array([-3.0, -1.0, 0.5, 2.0])
  expected = denoiser.predict(teacher, z, logsnr).x0
  for interval in (None, jnp.array([0.0, 0.3, 0.6, 0.9])):
    np.testing.assert_allclose(denoiser.predict(student, z, logsnr, interval=interval).x0,
                               expected, atol=1e-6)
  # the teacher's params take no interval: it is ignored
  np.testing.assert_array_equal(denoiser.predict(teacher, z, logsnr, interval=logsnr).x0, expected)


def test_jvp_through_the_unet_equals_central_finite_differences():
  """du/dt along (v, 0, 1) of a U-Net flow map (interval embedding made non-zero) against
  Richardson-extrapolated central differences: relative error <= 1e-3 in float32. The time and
  interval embeddings turn at up to 1000 rad per unit time, so the step is 1e-4 (0.1 rad), where
  float32 rounding stays small against the derivative (norm ~2e3)."""
  denoiser, _, student = _tiny_student()
  rng = jax.random.key(1)
  embedding = student["interval_embedding"]
  student["interval_embedding"] = {"kernel": 0.3 * jax.random.normal(rng, embedding["kernel"].shape),
                                   "bias": embedding["bias"]}
  objective = MeanFlowObjective(denoiser, None, optax.sgd(0.0), None, 10, (8, 8, 1))
  z = jax.random.normal(jax.random.fold_in(rng, 1), (2, 8, 8, 1))
  v = jax.random.normal(jax.random.fold_in(rng, 2), (2, 8, 8, 1))
  r, t = jnp.array([0.2, 0.5]), jnp.array([0.7, 0.6])
  u_fn = jax.jit(lambda z_, r_, t_: objective.average_velocity(student, z_, r_, t_, None))
  _, jvp = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  central = lambda h: (np.asarray(u_fn(z + h * v, r, t + h), np.float64)
                       - np.asarray(u_fn(z - h * v, r, t - h), np.float64)) / (2 * h)
  h = 1e-4
  fd = (4 * central(h / 2) - central(h)) / 3
  error = np.linalg.norm(np.asarray(jvp, np.float64) - fd) / np.linalg.norm(fd)
  assert error <= 1e-3, error
  assert np.linalg.norm(fd) > 1e-2


@pytest.mark.parametrize("field,value", [("velocity_source", "both"), ("time_std", 0.0),
                                         ("equal_share", 1.5), ("weight_c", 0.0),
                                         ("weight_p", -1.0), ("eval_steps", (1, 0))])
def test_invalid_meanflow_field_is_named(field, value):
  config = meanflow_method.get_config()
  meanflow_method.validate(config)
  config.meanflow[field] = value
  with pytest.raises(ConfigError, match=f"config.meanflow.{field}"):
    meanflow_method.validate(config)


def test_meanflow_trains_exports_and_reports(tmp_path):
  """A tiny run from a random tiny VP teacher: it trains, logs the tangent norm and weight
  range, exports a flow map sampled by 'flowmap' and writes the summary."""
  from conftest import tiny_teacher_params, tiny_unet
  from jdistill import methods
  from jdistill.train import teachers
  config = tiny_unet(meanflow_method.get_config("digits"))
  config.data.batch_size = 8
  config.teacher.update(sampling_steps=2, checkpoint=str(tmp_path / "teacher.msgpack"))
  config.train.update(num_steps=3, log_every=1, save_every=100, eval_every=0)
  config.eval.update(num_samples=16, neighbour_examples=50, batch_size=16)
  teachers.export(tiny_teacher_params(config, 0), config, config.teacher.checkpoint,
                  {"mode": "ddim", "steps": 2})
  run = tmp_path / "meanflow"
  methods.train(config, str(run))
  summary = (run / "summary.md").read_text()
  assert "| MeanFlow | 1 |" in summary and "| MeanFlow | 2 |" in summary
  assert "| teacher | 2 |" in summary
  exported = json.loads((run / "student.json").read_text())
  assert exported["sampling"] == {"mode": "flowmap", "steps": 1, "guidance": 0.0}
  assert max(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit()) == 3
  assert {"tangent_norm", "tangent_norm_max", "weight_min", "weight_max"} <= logged_tags(run)
  # the export samples alone, as the flow map it is (its interval embedding restored)
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "jdistill.sample", f"--checkpoint={run}/student.msgpack",
       "--num_samples=4", f"--out={tmp_path}/samples.npz"],
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=repo),
      cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert np.load(tmp_path / "samples.npz")["samples"].shape == (4, 8, 8, 1)


def logged_tags(workdir):
  """The scalar tags of a run's TensorBoard events."""
  import glob
  import tensorflow as tf
  return {value.tag for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
          for event in tf.compat.v1.train.summary_iterator(path) for value in event.summary.value}


def test_a_guidance_conditioned_flow_map_learns_the_teachers_cfg_velocity_at_its_w():
  """MeanFlow with student_guidance, at the start (the flow map is the conditional teacher at every
  h and w) and with r = t everywhere: u_tgt = v, the teacher's two-pass CFG velocity at the
  example's w, so the loss's mse is mean(w^2 (v(z, null) - v(z, c))^2) by hand."""
  from conftest import tiny_teacher_params, tiny_unet
  from jdistill import config as config_lib
  from jdistill.objectives.guided import draw_guidance
  from jdistill.objectives.meanflow import draw_times, flow_to_vp
  config = tiny_unet(config_lib.base_config("digits_cond"))
  denoiser = make_denoiser(config.model, (8, 8, 1), config.diffusion.parameterization)
  teacher = tiny_teacher_params(config, 0)
  objective = MeanFlowObjective(denoiser, schedules.make_schedule(config.diffusion.schedule),
                                optax.sgd(0.0), config.optim, 10, (8, 8, 1), equal_share=1.0,
                                guidance_range=(0.0, 4.0))
  student = objective.new_state(teacher).params
  rng = jax.random.key(5)
  x = jnp.asarray(np.random.RandomState(1).uniform(-1, 1, (6, 8, 8, 1)), jnp.float32)
  label = jnp.arange(6) % 10
  _, metrics = objective.loss(student, teacher, {"x": x, "label": label}, rng)
  rng_noise, rng_time = jax.random.split(rng)
  noise = jax.random.normal(rng_noise, x.shape)
  _, t = draw_times(rng_time, 6, objective.time_mean, objective.time_std, 1.0)
  w = draw_guidance(jax.random.fold_in(rng, 11), 6, (0.0, 4.0))[:, None, None, None]
  z, logsnr = flow_to_vp((1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise, t)
  velocity = lambda labels: (lambda p: p.eps - p.x0)(denoiser.predict(teacher, z, logsnr, labels))
  expected = jnp.mean((w * (velocity(jnp.full((6,), 10)) - velocity(label))) ** 2)
  np.testing.assert_allclose(metrics["mse"], expected, rtol=2e-4)
  assert float(expected) > 1e-4
