"""The rectified-flow path against hand computations: its conversions, time shift, Euler = DDIM,
the v-MSE weighting, the 2-step target on an exact Gaussian denoiser, the network's own time and
state, and model cards that tell a flow model from a VP one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill import config as config_lib
from jdistill.diffusion import losses, sampling, schedules
from jdistill.diffusion import parameterization as P
from jdistill.models.denoiser import Denoiser, network_time
from jdistill.objectives.denoising import draw_times
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import teachers

from test_diffusion import MU, S, schedule


def _flow_terms(tau):
  """(logsnr, alpha, sigma) of the VP state equivalent to flow time tau (a (B,) array)."""
  logsnr = 2.0 * (jnp.log1p(-tau) - jnp.log(tau))
  alpha, sigma = schedules.alpha_sigma(logsnr)
  return logsnr, alpha, sigma


def test_flow_path_conversions_round_trip():
  rng = np.random.default_rng(0)
  x, eps = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
  tau = jnp.array([0.02, 0.2, 0.4, 0.5, 0.8, 0.98])
  logsnr, alpha, sigma = _flow_terms(tau)
  z_flow = (1 - tau[:, None]) * x + tau[:, None] * eps
  z = alpha[:, None] * x + sigma[:, None] * eps                        # the VP state
  np.testing.assert_allclose(P.path_state(z, logsnr, "flow"), z_flow, atol=1e-6)
  np.testing.assert_allclose(schedules.flow_time(logsnr), tau, atol=1e-6)
  v = eps - x                                                          # dz_flow / dtau
  pred = P.from_model_output("v", jnp.asarray(v), z, logsnr, "flow")
  np.testing.assert_allclose(pred.x0, x, atol=1e-6)
  np.testing.assert_allclose(pred.eps, eps, atol=1e-6)
  np.testing.assert_allclose(pred.v, alpha[:, None] * eps - sigma[:, None] * x, atol=1e-6)
  np.testing.assert_allclose(P.path_velocity(pred, "flow"), v, atol=1e-6)
  # x- and eps-heads mean the same on both paths: each gives back the same prediction
  for head, output in (("x", x), ("eps", eps)):
    other = P.from_model_output(head, jnp.asarray(output), z, logsnr, "flow")
    np.testing.assert_allclose(other.x0, x, atol=1e-5)
    np.testing.assert_allclose(other.eps, eps, atol=1e-5)


def test_time_shift_and_its_inverse():
  t = jnp.linspace(0.0, 1.0, 11)
  # by hand: s = 3, t = 0.5 -> 1.5 / 2 = 0.75;  t = 0.25 -> 0.75 / 1.5 = 0.5
  np.testing.assert_allclose(schedules.shift_time(jnp.array([0.5, 0.25]), 3.0), [0.75, 0.5])
  for shift in (1.0, 0.5, 3.0):
    np.testing.assert_allclose(schedules.unshift_time(schedules.shift_time(t, shift), shift), t,
                               atol=1e-6)
  np.testing.assert_allclose(schedules.shift_time(t, 1.0), t)
  flow = schedule("flow", shift=3.0)
  np.testing.assert_allclose(flow(jnp.array([0.5])), [2.0 * np.log(0.25 / 0.75)], rtol=1e-6)
  np.testing.assert_allclose(flow(jnp.array([0.0, 1.0])), [20.0, -20.0])   # clipped ends


def test_flow_v_mse_is_the_velocity_mse():
  rng = np.random.default_rng(1)
  x, eps = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
  tau = jnp.array([0.1, 0.3, 0.6, 0.9])
  logsnr, alpha, sigma = _flow_terms(tau)
  z = alpha[:, None] * x + sigma[:, None] * eps
  v_hat = jnp.asarray(eps - x + 0.1 * rng.normal(size=(4, 7)))
  pred = P.from_model_output("v", v_hat, z, logsnr, "flow")
  by_hand = np.mean((np.asarray(v_hat) - (eps - x)) ** 2, axis=1)
  np.testing.assert_allclose(losses.weighted_x_loss(pred.x0, jnp.asarray(x), logsnr, "flow_v_mse"),
                             by_hand, rtol=1e-4)
  np.testing.assert_allclose(losses.x_mse_weight("flow_v_mse", logsnr), 1.0 / tau**2, rtol=1e-5)


def _exact_flow_velocity(z_flow, tau):
  """E[eps - x | z_flow] for x ~ N(MU, S^2 I) on the flow path z = (1 - tau) x + tau eps."""
  a = 1.0 - tau
  x_hat = MU + a * S**2 / (a**2 * S**2 + tau**2) * (z_flow - a * MU)
  eps_hat = (z_flow - a * x_hat) / tau
  return eps_hat - x_hat


def _exact_flow_denoiser(z, logsnr):
  """The exact Gaussian denoiser as a flow model: its velocity on the state it sees."""
  tau = P.broadcast_to_data(schedules.flow_time(logsnr), z)
  return P.from_model_output("v", _exact_flow_velocity(P.path_state(z, logsnr, "flow"), tau), z,
                             logsnr, "flow")


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_the_velocity_is_ddim(shift):
  """Euler z_s = z_t + (tau_s - tau_t) v on the flow's own state, by hand, against the sampler's
  DDIM and 'euler' modes (identical to each other)."""
  flow = schedule("flow", shift=shift)
  noise = jax.random.normal(jax.random.key(0), (32, 3))
  n = 8
  z_flow = noise * 1.0                    # at t = 1, tau = 1 (to the clip): z_flow = eps
  taus = schedules.flow_time(flow(jnp.arange(n + 1) / n))
  for i in range(n, 0, -1):
    v = _exact_flow_velocity(z_flow, taus[i])
    z_flow = z_flow + (taus[i - 1] - taus[i]) * v
  ddim = sampling.sample(_exact_flow_denoiser, flow, noise, n, clip_x=False)
  euler = sampling.sample(_exact_flow_denoiser, flow, noise, n, clip_x=False, mode="euler")
  np.testing.assert_array_equal(ddim, euler)
  np.testing.assert_allclose(ddim, z_flow, atol=2e-4)


def test_two_step_target_is_exact_for_a_flow_model():
  """One student step with the 2-step target lands on two exact teacher Euler steps."""
  flow = schedule("flow", shift=3.0)
  n = 4
  z_t = jax.random.normal(jax.random.key(1), (64, 3))
  i = jnp.arange(64) % n
  t, s = (i + 1) / n, i / n
  z_s, teacher_x = sampling.ddim_segment(_exact_flow_denoiser, flow, z_t, t, s, jnp.int32(2))
  x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, flow(t), flow(s), s)
  student = P.from_x0(x_target, z_t, flow(t))
  landed = sampling.ddim_step(student, flow(s))
  interior = np.asarray(s > 0)
  np.testing.assert_allclose(np.asarray(landed)[interior], np.asarray(z_s)[interior], atol=1e-4)
  # the same two steps taken by hand as Euler steps on the flow state
  u = t - 0.5 / n
  tau = lambda time: P.broadcast_to_data(schedules.flow_time(flow(time)), z_t)
  zf = P.path_state(z_t, flow(t), "flow")
  zf = zf + (tau(u) - tau(t)) * _exact_flow_velocity(zf, tau(t))
  zf = zf + (tau(s) - tau(u)) * _exact_flow_velocity(zf, tau(u))
  np.testing.assert_allclose(np.asarray(P.path_state(z_s, flow(s), "flow"))[interior],
                             np.asarray(zf)[interior], atol=1e-4)


class _Recorder(nn.Module):
  """Outputs its input state, and records the time it was given."""
  @nn.compact
  def __call__(self, z, time, label=None, train=False):
    self.sow("intermediates", "time", time)
    return z + 0.0 * self.param("w", nn.initializers.zeros, ())


@pytest.mark.parametrize("time_input,scale", [("t", 1.0), ("t1000", 1000.0)])
def test_a_flow_network_sees_its_own_state_and_time(time_input, scale):
  tau = jnp.array([0.25, 0.5, 0.75])
  logsnr, alpha, sigma = _flow_terms(tau)
  z = jnp.ones((3, 2)) * (alpha + sigma)[:, None]           # z_flow = 1
  denoiser = Denoiser(_Recorder(), "x", path="flow", time_input=time_input)
  params = denoiser.init(jax.random.key(0), z)["params"]
  _, state = denoiser.apply_module(params, z, logsnr, None, mutable=["intermediates"])
  np.testing.assert_allclose(state["intermediates"]["time"][0], scale * tau, rtol=1e-6)
  np.testing.assert_allclose(denoiser.predict(params, z, logsnr).x0, jnp.ones((3, 2)), atol=1e-6)
  np.testing.assert_allclose(network_time(logsnr, "logsnr"), logsnr)


def test_logit_normal_times():
  t = draw_times(jax.random.key(0), 200_000, "logit_normal", 0.5, 2.0)
  logit = np.log(t) - np.log1p(-t)
  np.testing.assert_allclose([logit.mean(), logit.std()], [0.5, 2.0], atol=0.02)
  assert float(jnp.min(draw_times(jax.random.key(1), 1000))) >= 0.0


def test_an_exported_flow_model_refuses_a_vp_config(tmp_path):
  flow = config_lib.base_config("digits_flow")
  flow.diffusion.schedule.shift = 3.0
  params = {"w": np.ones((2, 3), np.float32)}
  path = str(tmp_path / "teacher.msgpack")
  teachers.export(params, flow, path, {"mode": "euler", "steps": 4})
  card = teachers.model_card(teachers.read_export(path))
  assert card["diffusion.path"] == "flow"
  assert card["diffusion.schedule"] == {"name": "flow", "shift": 3.0}
  with pytest.raises(ckpt_lib.CheckpointError) as info:
    teachers.load_checkpoint(path, params, config_lib.base_config("digits"))
  message = str(info.value)
  assert "diffusion.path='flow'" in message and "config.diffusion.path='vp'" in message
  assert "'shift': 3.0" in message and path in message
  loaded = teachers.load_checkpoint(path, jax.device_put(params), flow)   # its own config loads it
  np.testing.assert_array_equal(loaded["w"], params["w"])


@pytest.mark.parametrize("name,preset", [
    ("teacher", "digits_flow"), ("progressive", "digits_flow"), ("dmd", "digits_flow"),
    ("dmd", "digits_flow_paper"), ("tdm", "digits_flow"), ("tdm", "digits_flow_fresh_noise"),
    ("multi_teacher", "digits_flow"), ("curriculum", "adaptive_flow"), ("reflow", "digits_flow")])
def test_every_method_has_a_flow_preset(name, preset):
  """Each is its VP twin on the flow path: the same sizes and budget, the flow's schedule and
  loss, and the bundled flow teacher."""
  import importlib
  from jdistill import methods
  get_config = importlib.import_module(f"configs.{name}").get_config
  config = get_config(preset)
  methods.validate(config, 1)
  assert config.diffusion.schedule.name == "flow"
  assert config.diffusion.loss_weighting == "flow_v_mse"
  twin = get_config(preset.replace("_flow", "")) if name != "reflow" else None
  if twin is not None:
    differ = {k for k, v in config.to_dict().items() if v != twin.to_dict().get(k)}
    assert differ <= {"diffusion", "preset", "multi_teacher", "dmd"}, differ
    assert config.train == twin.train and config.optim == twin.optim and config.model == twin.model
  if name == "multi_teacher":
    assert config.multi_teacher.teachers.base.checkpoint == teachers.BUNDLED_DIGITS_FLOW_TEACHER
  elif name != "teacher":
    config.teacher.checkpoint = ""
    assert teachers.bundled_teacher_path(config) in (None, teachers.BUNDLED_DIGITS_FLOW_TEACHER)


class _Velocity(nn.Module):
  """A fixed nonlinear 'velocity' of the state and time it is given."""
  @nn.compact
  def __call__(self, z, time, label=None, train=False):
    return jnp.tanh(z) * (0.5 + time[:, None, None, None]) + self.param("b", nn.initializers.ones, ())


def test_a_flow_teacher_cache_holds_its_velocity_and_reads_back_its_x():
  from jdistill.data.cache.build import PREDICTIONS, _teacher_fn
  from jdistill.objectives.multi_teacher import MultiTeacherObjective
  flow = schedule("flow", shift=2.0)
  denoiser = Denoiser(_Velocity(), "v", path="flow", time_input="t")
  rng = np.random.default_rng(3)
  x, eps = (jnp.asarray(rng.normal(size=(5, 4, 4, 1)), jnp.float32) for _ in range(2))
  t = jnp.array([0.1, 0.3, 0.5, 0.7, 0.9])
  params = denoiser.init(jax.random.key(0), x)["params"]
  stored = _teacher_fn(denoiser, flow, "float32")(params, x, t, eps, {})
  z, logsnr = P.forward_process(x, t, eps, flow)
  pred = denoiser.predict(params, z, logsnr)
  np.testing.assert_allclose(stored, pred.eps - pred.x0, atol=1e-5)      # the flow velocity
  z_flow = P.path_state(z, logsnr, "flow")
  np.testing.assert_allclose(stored, _Velocity().apply({"params": params}, z_flow,
                                                       schedules.flow_time(logsnr)), atol=1e-5)
  assert PREDICTIONS[denoiser.path] == "flow_v"
  student = MultiTeacherObjective(denoiser, flow, None, None, 1, (4, 4, 1), teacher_ids=("a",))
  batch = {"x": x, "eps": eps, "t": t, "teacher_v": stored[:, None]}
  _, _, teacher_x, _ = student.targets(batch, jnp.ones((1,)))
  np.testing.assert_allclose(teacher_x[:, 0], pred.x0, atol=1e-5)
