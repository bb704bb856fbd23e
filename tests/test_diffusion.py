"""Schedules, parameterizations, losses and samplers against hand computations and closed forms."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jdistill.diffusion import losses, sampling, schedules
from jdistill.diffusion import parameterization as P

from conftest import tiny_teacher_params, tiny_unet


def schedule(name="cosine", **kw):
  c = ml_collections.ConfigDict(dict(name=name, num_train_timesteps=1000, beta_start=0.00085,
                                     beta_end=0.012))
  c.update(kw)
  return schedules.make_schedule(c)


def test_cosine_schedule_endpoints_and_monotone():
  s = schedule()
  t = jnp.linspace(0, 1, 101)
  logsnr = s(t)
  np.testing.assert_allclose([logsnr[0], logsnr[-1]], [20.0, -20.0], atol=2e-3)
  assert np.all(np.diff(np.asarray(logsnr)) < 0)
  # unclipped cosine: logsnr(0.5) = -2 log tan(pi/4) = 0 up to the clipping's tiny shift
  assert abs(float(s(0.5))) < 1e-3


def test_alpha_sigma_identities():
  logsnr = jnp.linspace(-20, 20, 41)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(jnp.log(alpha**2 / sigma**2), logsnr, atol=1e-3)


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_discrete_schedules_match_ddpm_alphas_cumprod(name):
  s = schedule(name)
  if name == "linear":
    betas = np.linspace(0.00085, 0.012, 1000)
  else:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  alphas_cumprod = np.cumprod(1 - betas)
  k = np.array([1, 10, 500, 1000])
  alpha, _ = schedules.alpha_sigma(s(k / 1000.0))
  np.testing.assert_allclose(np.asarray(alpha) ** 2, alphas_cumprod[k - 1], rtol=1e-4)


def test_zero_terminal_snr_rescale_reaches_pure_noise_and_keeps_the_first_alpha():
  """Lin et al. 2024, Algorithm 1, by hand: sqrt(alpha_bar) shifted so its last value is 0 and
  scaled so its first is unchanged."""
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  root = np.sqrt(np.cumprod(1 - betas))
  rescaled = (root - root[-1]) * root[0] / (root[0] - root[-1])
  plain, zero = schedule("scaled_linear"), schedule("scaled_linear", zero_terminal_snr=True)
  assert 0.06 < float(schedules.alpha_sigma(plain(1.0))[0]) < 0.07    # short of pure noise
  assert float(schedules.alpha_sigma(zero(1.0))[0]) < 1e-4             # logSNR clipped at -20
  k = np.array([1, 10, 500, 900])
  alpha, _ = schedules.alpha_sigma(zero(k / 1000.0))
  np.testing.assert_allclose(np.asarray(alpha), rescaled[k - 1], rtol=1e-4)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match="schedule.name"):
    schedule("quadratic")


@pytest.mark.parametrize("kind", ["eps", "x", "v", "both"])
def test_parameterizations_are_consistent(kind):
  rng = np.random.RandomState(0)
  x = rng.randn(4, 3).astype(np.float32)
  eps = rng.randn(4, 3).astype(np.float32)
  logsnr = jnp.array([-5.0, -1.0, 1.0, 5.0])
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None])
  z = alpha * x + sigma * eps
  v = alpha * eps - sigma * x
  output = {"eps": eps, "x": x, "v": v, "both": np.concatenate([x, eps], -1)}[kind]
  pred = P.from_model_output(kind, jnp.asarray(output), z, logsnr)
  np.testing.assert_allclose(pred.x0, x, atol=2e-5)
  np.testing.assert_allclose(pred.eps, eps, atol=2e-5)
  np.testing.assert_allclose(pred.v, v, atol=2e-5)


def test_both_mixes_x_and_eps_heads_by_sigma_squared():
  z = jnp.array([[0.3]])
  logsnr = jnp.array([0.7])
  alpha, sigma = (float(a) for a in schedules.alpha_sigma(logsnr[0]))
  x_tilde, eps_tilde = 0.2, -0.4
  pred = P.from_model_output("both", jnp.array([[x_tilde, eps_tilde]]), z, logsnr)
  expected = sigma**2 * x_tilde + alpha**2 * (0.3 - sigma * eps_tilde) / alpha
  np.testing.assert_allclose(float(pred.x0[0, 0]), expected, rtol=1e-6)


def test_loss_weights_against_hand_computation():
  logsnr = jnp.log(jnp.array([0.25, 1.0, 4.0, 100.0]))     # SNR 0.25, 1, 4, 100
  np.testing.assert_allclose(losses.x_mse_weight("eps_mse", logsnr), [0.25, 1, 4, 100], rtol=1e-5)
  np.testing.assert_allclose(losses.x_mse_weight("v_mse", logsnr), [1.25, 2, 5, 101], rtol=1e-5)
  np.testing.assert_allclose(losses.x_mse_weight("snr_trunc", logsnr), [1, 1, 4, 100], rtol=1e-5)
  np.testing.assert_allclose(losses.x_mse_weight("min_snr", logsnr, 5.0), [0.25, 1, 4, 5], rtol=1e-5)
  np.testing.assert_allclose(losses.x_mse_weight("x_mse", logsnr), [1, 1, 1, 1])
  # eps-MSE of a prediction equals SNR * x-MSE of the same prediction
  x, eps = jnp.ones((1, 2)), jnp.array([[0.5, -0.5]])
  ls = jnp.array([1.3])
  alpha, sigma = schedules.alpha_sigma(ls)
  z = alpha * x + sigma * eps
  wrong = P.from_x0(x + 0.1, z, ls)
  np.testing.assert_allclose(losses.per_example_mse(wrong.eps, eps),
                             losses.weighted_x_loss(wrong.x0, x, ls, "eps_mse"), rtol=1e-5)


# ---- samplers against the exact denoiser of Gaussian data x ~ N(mu, s^2 I)
MU, S = 0.3, 0.5


def exact_gaussian_denoiser(z, logsnr):
  alpha, sigma = schedules.alpha_sigma(P.broadcast_to_data(logsnr, z))
  x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (z - alpha * MU)   # E[x | z_t]
  return P.from_x0(x0, z, logsnr)


def ode_solution(noise, sched):
  """The probability-flow ODE keeps u = (z_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed."""
  alpha, sigma = schedules.alpha_sigma(sched(1.0))
  return MU + S * (noise - alpha * MU) / jnp.sqrt(alpha**2 * S**2 + sigma**2)


def test_ddim_converges_to_closed_form_ode_solution_at_first_order():
  sched = schedule()
  noise = jax.random.normal(jax.random.key(0), (256, 2))
  target = ode_solution(noise, sched)
  errors = [float(jnp.max(jnp.abs(sampling.sample(exact_gaussian_denoiser, sched, noise, n,
                                                  clip_x=False) - target))) for n in (16, 64, 256)]
  assert errors[2] < 0.01
  for coarse, fine in zip(errors, errors[1:]):       # 4x the steps -> ~4x smaller error
    assert 3.0 < coarse / fine < 5.0


def test_ddim_is_exact_in_one_step_for_a_point_mass():
  sched = schedule()
  point = lambda z, logsnr: P.from_x0(jnp.full_like(z, 0.7), z, logsnr)
  noise = jax.random.normal(jax.random.key(1), (8, 3))
  np.testing.assert_allclose(sampling.sample(point, sched, noise, 1, clip_x=False), 0.7, atol=1e-6)
  np.testing.assert_allclose(sampling.sample(point, sched, noise, 5, clip_x=False), 0.7, atol=1e-5)


def test_ancestral_sampler_matches_gaussian_moments():
  sched = schedule()
  noise = jax.random.normal(jax.random.key(2), (20000, 1))
  x = sampling.sample(exact_gaussian_denoiser, sched, noise, 200, clip_x=False,
                      rng=jax.random.key(3))
  assert abs(float(x.mean()) - MU) < 0.02
  assert abs(float(x.std()) - S) < 0.02


def test_ancestral_step_posterior_against_hand_formula():
  z_t, x0 = jnp.array([[0.4]]), jnp.array([[0.1]])
  lt, ls = jnp.array([-1.0]), jnp.array([2.0])
  at, st = (float(v) for v in schedules.alpha_sigma(-1.0))
  as_, ss = (float(v) for v in schedules.alpha_sigma(2.0))
  ats = at / as_
  var_ts = st**2 - ats**2 * ss**2
  mean = ats * ss**2 / st**2 * 0.4 + as_ * var_ts / st**2 * 0.1
  std = np.sqrt(var_ts * ss**2 / st**2)
  pred = P.from_x0(x0, z_t, lt)
  out = sampling.ancestral_step(pred, z_t, lt, ls, jnp.array([[1.5]]))
  np.testing.assert_allclose(float(out[0, 0]), mean + 1.5 * std, rtol=1e-5)


def test_clipping_keeps_prediction_consistent():
  z, logsnr = jnp.array([[3.0, -0.2]]), jnp.array([0.5])
  pred = P.clip_x0(P.from_x0(jnp.array([[2.0, -0.2]]), z, logsnr), z, logsnr)
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None])
  np.testing.assert_allclose(pred.x0, [[1.0, -0.2]])
  np.testing.assert_allclose(alpha * pred.x0 + sigma * pred.eps, z, atol=1e-6)


def test_one_compilation_serves_every_step_count():
  sched = schedule()
  noise = jnp.zeros((4, 2))

  @jax.jit
  def run(num_steps):
    return sampling.sample(exact_gaussian_denoiser, sched, noise, num_steps, clip_x=False)

  outputs = [run(jnp.int32(n)) for n in (1, 2, 4, 64, 256)]
  assert run._cache_size() == 1
  # and the traced count really changes the trajectory length (DDIM error shrinks with steps)
  target = ode_solution(noise, sched)
  assert float(jnp.abs(outputs[-1] - target).max()) < float(jnp.abs(outputs[0] - target).max())


def test_classifier_free_guidance_combination():
  a = P.Prediction(jnp.ones(2), 2 * jnp.ones(2), 3 * jnp.ones(2))
  b = P.Prediction(jnp.zeros(2), jnp.ones(2), jnp.ones(2))
  guided = P.combine([(1.5, a), (-0.5, b)])
  np.testing.assert_allclose(guided.x0, 1.5)
  np.testing.assert_allclose(guided.eps, 2.5)
  np.testing.assert_allclose(guided.v, 4.0)


def test_conditional_unet_and_classifier_free_guidance():
  from jdistill.config import base_config
  from jdistill.models.denoiser import make_denoiser
  config = tiny_unet(base_config("digits_cond"))
  denoiser = make_denoiser(config.model, (8, 8, 1), "v")
  params = jax.tree.map(jnp.asarray, tiny_teacher_params(config, 0))   # outputs depend on the input
  z = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
  logsnr = jnp.array([-2.0, 0.0, 2.0])
  label = jnp.array([1, 2, 3])
  predict, predict_guided = jax.jit(denoiser.predict), jax.jit(denoiser.predict_guided)
  conditional = predict(params, z, logsnr, label)
  unconditional = predict(params, z, logsnr, jnp.full((3,), 10))
  assert float(jnp.abs(conditional.x0 - unconditional.x0).max()) > 1e-4   # the label matters
  np.testing.assert_allclose(predict_guided(params, z, logsnr, label, 0.0).x0,
                             conditional.x0, atol=1e-5)
  guided = predict_guided(params, z, logsnr, label, 2.0)
  np.testing.assert_allclose(guided.eps, 3.0 * conditional.eps - 2.0 * unconditional.eps, atol=1e-4)
