"""DMD2 / TDM: critic learning, the zero-gradient fixed point, update ratio, checkpoint/resume,
sharded == one device, TDM-unify step conditioning."""
import dataclasses
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers

from jdistill import methods
from jdistill.methods import distribution_matching as dm_method
from jdistill.data import pipeline
from jdistill.objectives import distribution_matching as dm
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup
from jdistill import partitioning

from conftest import perturbed


def _setup(tmp_path, variant="dmd2", **dmd):
  config = dm_method.get_config("toy2d", variant)
  config.model.update(channels=32, num_res_blocks=1)
  config.data.batch_size = 64
  config.dmd.update(dmd)
  exp = setup.build(config, str(tmp_path), evaluator=False)
  objective = dm_method.make_objective(exp, 100)
  teacher = jax.jit(lambda r: nn.unbox(exp.denoiser.init(r, jnp.zeros((1, 2)))["params"]))(jax.random.key(0))
  teacher = perturbed(teacher, 0.05, 1)
  return exp, objective, teacher


def _batches(exp, n):
  iterator = pipeline.make_iterator(exp.train_data())
  return [pipeline.to_global(next(iterator), partitioning.batch_sharding(exp.mesh)) for _ in range(n)]


@pytest.mark.parametrize("variant", ["dmd2", "tdm"])
def test_critic_loss_falls_on_a_fixed_generator(tmp_path, variant):
  exp, objective, teacher = _setup(tmp_path, variant, critic_updates_per_generator=10_000, critic_lr=1e-3)
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(teacher)
  generator_before = jax.device_get(state.generator.params)
  losses = []
  batch = _batches(exp, 1)[0]
  for i in range(60):       # one fixed problem: same batch, noise and timesteps every step
    state, metrics = compiled.fn(state, batch, jax.random.key(0), dm.DistributionMatchingFrozen(teacher=teacher), None)
    losses.append(float(metrics["critic_loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  for a, b in zip(jax.tree.leaves(jax.device_get(state.generator.params)), jax.tree.leaves(generator_before)):
    np.testing.assert_array_equal(a, b)          # the generator was never updated


@pytest.mark.parametrize("variant", ["dmd2", "tdm"])
def test_generator_gradient_vanishes_when_fake_score_equals_real_score(tmp_path, variant):
  """The generator samples the teacher's distribution exactly when its critic is the teacher:
  then x_real = x_fake and the distribution-matching gradient is exactly zero."""
  exp, objective, teacher = _setup(tmp_path, variant, generator_steps=2)
  noise = jax.random.normal(jax.random.key(3), (64, 2))
  steps = objective.draw_step_counts(jax.random.key(2), 64)
  z_k, t_k = objective.rollout(teacher, noise, None, steps, jax.random.key(4))

  def grad_norm(critic_score):
    grads = jax.grad(lambda p: objective.generator_loss(
        p, {"score": critic_score, "gan_head": {}}, teacher, z_k, t_k, None, steps,
        jax.random.key(5))[0])(teacher)
    return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))

  assert grad_norm(teacher) < 1e-6
  other = perturbed(teacher, 0.05, 6)
  assert grad_norm(other) > 1e-3


def test_update_ratio_is_respected(tmp_path):
  """The loop's two static programs (critic-only, critic + generator) follow the ratio and give
  the same states, step for step, as the single program deciding by lax.cond."""
  exp, objective, teacher = _setup(tmp_path, critic_updates_per_generator=5)
  compiled = loop.compile_step(objective, exp.mesh)
  make_state = jax.jit(objective.new_state)
  phased, by_cond = make_state(teacher), make_state(teacher)
  updated = []
  for i, batch in enumerate(_batches(exp, 12)):
    phased, metrics = compiled(phased, batch, jax.random.key(i), dm.DistributionMatchingFrozen(teacher=teacher), None, i)
    by_cond, cond_metrics = compiled.fn(by_cond, batch, jax.random.key(i), dm.DistributionMatchingFrozen(teacher=teacher), None)
    updated.append(int(metrics["generator_updated"]))
    assert int(cond_metrics["generator_updated"]) == updated[-1]
  assert updated == [0, 0, 0, 0, 1] * 2 + [0, 0]
  for state in (phased, by_cond):
    assert int(state.critic.step) == 12 and int(state.generator.step) == 2 and int(state.step) == 12
    assert state.critic.ema_params is None          # no EMA copy of the critic
  for a, b in zip(jax.tree.leaves(jax.device_get(phased)), jax.tree.leaves(jax.device_get(by_cond))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_keeps_both_networks_and_optimizers(tmp_path):
  exp, objective, teacher = _setup(tmp_path, critic_updates_per_generator=2, gan_weight=0.1)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  compiled = loop.compile_step(objective, exp.mesh)
  make_state = jax.jit(objective.new_state)
  common = dict(workdir=str(tmp_path / "run"), mesh=exp.mesh, writer=writer,
                frozen=dm.DistributionMatchingFrozen(teacher=teacher), compiled=compiled,
                initial_state=lambda: make_state(teacher))
  settings = lambda n: loop.Settings(num_steps=n, log_every=3, save_every=3)
  unbroken, _ = loop.run(objective, settings(9), train_data=exp.train_data(),
                         **dict(common, workdir=str(tmp_path / "unbroken")))
  loop.run(objective, settings(6), train_data=exp.train_data(), **common)
  manager = ckpt_lib.manager(str(tmp_path / "run" / "checkpoints"), asynchronous=False)
  restored, _ = ckpt_lib.restore(manager, compiled.abstract_state)
  assert set(restored.critic.params) == {"score", "gan_head"} and int(restored.generator.step) == 3
  resumed, _ = loop.run(objective, settings(9), train_data=exp.train_data(), **common)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(unbroken))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDED_SCRIPT = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    assert jax.device_count() == 8
    from jdistill.methods import distribution_matching as dm_method
    from jdistill.data import pipeline
    from jdistill.objectives import distribution_matching as dm
    from jdistill.train import loop, setup
    from jdistill import partitioning
    config = dm_method.get_config("digits", "dmd2")
    config.model.update(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    config.data.batch_size = 16
    config.dmd.update(critic_updates_per_generator=2, generator_steps=2, regression_steps=2)
    exp = setup.build(config, "{workdir}", evaluator=False)
    objective = dm_method.make_objective(exp, 100)
    boxed = exp.denoiser.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    teacher = jax.device_get(nn.unbox(boxed))
    iterator = pipeline.make_iterator(exp.train_data())
    batches = [next(iterator) for _ in range(4)]
    pairs = jax.device_get(objective.regression_pairs(teacher, 64))      # DMD1 regression on
    results = {{}}
    for name, mesh in [("one", partitioning.make_mesh(1, jax.devices()[:1])),
                       ("fsdp2x4", partitioning.make_mesh(4))]:
      compiled = loop.compile_step(objective, mesh, frozen_shardings=dm.DistributionMatchingFrozen(
          teacher=partitioning.shardings_for(boxed, mesh), regression=partitioning.replicated(mesh)))
      state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)(teacher)
      for i, b in enumerate(batches):
        state, metrics = compiled.fn(state, pipeline.to_global(b, partitioning.batch_sharding(mesh)),
                                     jax.random.key(i), dm.DistributionMatchingFrozen(teacher, pairs), None)
      specs = [str(x.sharding.spec) for x in jax.tree.leaves(state)]
      results[name] = (jax.device_get(state), float(metrics["critic_loss"]), sum("fsdp" in s for s in specs))
    one = results["one"]
    state, loss, fsdp_sharded = results["fsdp2x4"]
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(one[0])))
    print(f"fsdp2x4 maxdiff={{diff:.3g}} loss={{loss:.7f}} one_loss={{one[1]:.7f}} fsdp_leaves={{fsdp_sharded}}")
""")


def test_sharded_step_equals_one_device_step(tmp_path):
  """Generator, critic (both with optimizer states) and EMA sharded FSDP 2x4 == one device."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(workdir=tmp_path)], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if "maxdiff" in l)
  fields = dict(kv.split("=") for kv in line.split()[1:])
  assert float(fields["maxdiff"]) < 2e-5, line
  np.testing.assert_allclose(float(fields["loss"]), float(fields["one_loss"]), rtol=1e-5)
  assert int(fields["fsdp_leaves"]) > 30        # generator, EMA, critic and Adam moments sharded


def test_unify_generator_starts_as_the_teacher_and_learns_per_step_count(tmp_path):
  """TDM-unify: a zero step embedding makes the generator the teacher; training draws K from
  (1, 2, 4), rolls each example out on its own K-step grid, and moves the embedding."""
  exp, objective, teacher = _setup(tmp_path, "tdm", unify_steps=(1, 2, 4), critic_updates_per_generator=1)
  state = jax.jit(objective.new_state)(teacher)
  generator = state.generator.params
  assert generator["step_embedding"]["embedding"].shape[0] > 4
  assert "step_embedding" in state.critic.params["score"]
  z = jax.random.normal(jax.random.key(0), (16, 2))
  logsnr = jnp.linspace(-5.0, 5.0, 16)
  for k in (1, 2, 4):
    np.testing.assert_allclose(
        exp.denoiser.predict(generator, z, logsnr, steps=jnp.full((16,), k)).x0,
        exp.denoiser.predict(teacher, z, logsnr).x0, atol=1e-6)

  steps = objective.draw_step_counts(jax.random.key(1), 4096)
  assert set(np.unique(steps).tolist()) == {1, 2, 4}
  np.testing.assert_allclose(np.bincount(steps)[[1, 2, 4]] / 4096, 1 / 3, atol=0.03)
  _, t_k = objective.rollout(generator, jax.random.normal(jax.random.key(2), (4096, 2)), None, steps,
                             jax.random.key(3))
  for k in (1, 2, 4):                  # t_k on the K-step grid {1, (K-1)/K, ..., 1/K}, each equally often
    grid, counts = np.unique(np.asarray(t_k)[np.asarray(steps) == k], return_counts=True)
    np.testing.assert_allclose(grid, np.arange(1, k + 1) / k, atol=1e-6)
    assert counts.min() > 0.7 * counts.max()

  compiled = loop.compile_step(objective, exp.mesh)
  for i, batch in enumerate(_batches(exp, 3)):
    state, _ = compiled.fn(state, batch, jax.random.key(i), dm.DistributionMatchingFrozen(teacher=teacher), None)
  table = np.asarray(state.generator.params["step_embedding"]["embedding"])
  assert np.abs(table[[1, 2, 4]]).max() > 0 and np.abs(table[[0, 3, 5]]).max() == 0
  # the sampler tells the generator its step count: 1-step samples differ from K-blind ones
  unconditioned = dict(state.generator.params)
  del unconditioned["step_embedding"]
  told = exp.sampler.sample(state.generator.params, 1, 64)
  blind = exp.sampler.sample(unconditioned, 1, 64)
  assert np.abs(told - blind).max() > 1e-6


@pytest.mark.parametrize("variant,steps", [("dmd2", 1), ("tdm", 2), ("tdm", 4)])
def test_regression_pairs_are_the_teacher_ode_and_zero_loss_for_the_teacher(tmp_path, variant, steps):
  """The pairs hold the teacher's DDIM trajectory from the stored noise at t = m / K; with one
  teacher step per generator step (regression_steps = K), the generator initialised from the
  teacher lands on every segment's end exactly (loss 0: K = 1 is DMD1's G(noise) -> x), a
  perturbed one does not."""
  from jdistill.diffusion.sampling import ddim_step, sample
  exp, objective, teacher = _setup(tmp_path, variant, generator_steps=steps, regression_weight=1.0,
                                   regression_steps=steps)
  pairs = objective.regression_pairs(teacher, 40, seed=3, batch_size=16)
  trajectory = pairs["trajectory"]
  assert trajectory.shape == (40, steps + 1, 2)
  predict = lambda z, logsnr: exp.denoiser.predict(teacher, z, logsnr)
  noise = trajectory[:5, 0]
  np.testing.assert_allclose(trajectory[:5, -1], sample(predict, exp.schedule, noise, steps, clip_x=False),
                             atol=1e-5)
  if steps > 1:             # the first state after the noise: one teacher DDIM step 1 -> 1 - 1/K
    by_hand = ddim_step(predict(noise, jnp.full((5,), exp.schedule(1.0))),
                        jnp.full((5,), exp.schedule(1.0 - 1.0 / steps)))
    np.testing.assert_allclose(trajectory[:5, 1], by_hand, atol=1e-5)
  counts = objective.draw_step_counts(jax.random.key(0), 64)
  assert float(objective.regression_loss(teacher, pairs, counts, jax.random.key(4))) < 1e-9
  perturbed = jax.tree.map(lambda p: p * 1.1, teacher)
  assert float(objective.regression_loss(perturbed, pairs, counts, jax.random.key(4))) > 1e-4
  z_k, t_k = objective.rollout(teacher, jax.random.normal(jax.random.key(1), (64, 2)), None, counts,
                               jax.random.key(2))
  _, metrics = objective.generator_loss(teacher, {"score": teacher, "gan_head": {}}, teacher, z_k,
                                        t_k, None, counts, jax.random.key(4), pairs)
  assert float(metrics["regression_loss"]) < 1e-9


@pytest.mark.parametrize("steps", [2, 4])
def test_data_regression_is_the_teachers_segment_from_noised_data(tmp_path, steps):
  """regression_source='data': step k from data noised to t_k onto the teacher's DDIM segment
  t_k -> s_k run online. Against a hand computation with two teacher substeps per step; with
  one substep (regression_steps = K) the teacher itself has loss 0, a perturbed one does not."""
  from jdistill.diffusion.sampling import ddim_step
  from jdistill.diffusion.schedules import alpha_sigma
  _, objective, teacher = _setup(tmp_path, "tdm", generator_steps=steps, regression_weight=1.0,
                                 regression_steps=2 * steps, regression_source="data")
  x = jax.random.normal(jax.random.key(7), (64, 2))
  counts = objective.draw_step_counts(jax.random.key(0), 64)
  perturbed = jax.tree.map(lambda p: p * 1.1, teacher)
  rng = jax.random.key(4)

  # by hand, from the same draws: k, eps -> z_t -> two teacher DDIM steps -> x_target
  rng_k, rng_eps = jax.random.split(rng)
  k = np.asarray(dm.draw_step_index(rng_k, counts))
  t, s = (steps - k) / steps, (steps - k - 1) / steps
  logsnr = lambda time: objective.schedule(jnp.asarray(time, jnp.float32))
  alpha_t, sigma_t = (v[:, None] for v in alpha_sigma(logsnr(t)))
  alpha_s, sigma_s = (v[:, None] for v in alpha_sigma(logsnr(s)))
  z_t = alpha_t * x + sigma_t * jax.random.normal(rng_eps, x.shape)
  predict = lambda z, time: objective.denoiser.predict(teacher, z, logsnr(time))
  z_mid = ddim_step(predict(z_t, t), logsnr((t + s) / 2))
  end = predict(z_mid, (t + s) / 2)
  z_s = ddim_step(end, logsnr(s))
  ratio = sigma_s / sigma_t
  x_target = np.where(s[:, None] == 0, end.x0, (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t))
  x_student = objective.denoiser.predict(perturbed, z_t, logsnr(t)).x0
  by_hand = np.mean(np.mean((np.asarray(x_student) - x_target) ** 2, axis=-1))
  loss = objective.data_regression_loss(perturbed, teacher, x, None, counts, rng)
  np.testing.assert_allclose(float(loss), by_hand, rtol=1e-4)

  one_substep = dataclasses.replace(objective, regression_steps=steps)
  assert float(one_substep.data_regression_loss(teacher, teacher, x, None, counts, rng)) < 1e-9
  assert float(one_substep.data_regression_loss(perturbed, teacher, x, None, counts, rng)) > 1e-4
  # in the generator loss, from the batch's data; no pairs are needed
  z_k, t_k = objective.rollout(teacher, jax.random.normal(jax.random.key(1), (64, 2)), None,
                               counts, jax.random.key(2))
  _, metrics = one_substep.generator_loss(teacher, {"score": teacher, "gan_head": {}}, teacher, z_k,
                                          t_k, None, counts, jax.random.key(4), None, x)
  assert float(metrics["regression_loss"]) < 1e-9


def test_tdm_step_intervals_diffuse_each_step_within_its_own_noise_levels(tmp_path):
  """step_intervals: x_hat of the step t_k -> t_k - 1/K is diffused only to t in [t_k - 1/K, t_k]
  (clipped to [t_min, t_max] for the generator); DMD2 keeps the full range."""
  _, objective, _ = _setup(tmp_path, "tdm", generator_steps=4, step_intervals=True)
  t_k = jnp.array([1.0, 0.75, 0.5, 0.25])
  steps = jnp.full((4,), 4)
  low, high = objective.noise_interval(t_k, steps)
  np.testing.assert_allclose(low, [0.75, 0.5, 0.25, 0.0], atol=1e-7)
  np.testing.assert_allclose(high, t_k)
  low, high = objective.noise_interval(t_k, steps, 0.02, 0.98)
  np.testing.assert_allclose(low, [0.75, 0.5, 0.25, 0.02], atol=1e-7)
  np.testing.assert_allclose(high, [0.98, 0.75, 0.5, 0.25])
  _, t, _ = objective._noise(jnp.zeros((4, 2)), jax.random.key(0), low, high)
  assert np.all((np.asarray(t) >= np.asarray(low)) & (np.asarray(t) <= np.asarray(high)))
  _, dmd2, _ = _setup(tmp_path, "dmd2", generator_steps=4, step_intervals=True)
  assert dmd2.noise_interval(t_k, steps, 0.02, 0.98) == (0.02, 0.98)


def test_driver_writes_summary_and_keeps_the_best_generator(tmp_path):
  """configs/dmd.py:toy2d end to end on the bundled checkerboard teacher (few steps)."""
  import json
  config = dm_method.get_config("toy2d", "dmd2")
  config.train.update(num_steps=20, eval_every=10, save_every=10, log_every=10)
  config.eval.update(num_samples=500, final_num_samples=600)
  config.dmd.update(critic_updates_per_generator=2, eval_steps=(1,))
  generator = methods.train(config, str(tmp_path))
  summary = open(tmp_path / "summary.md").read()
  assert "| teacher (DDIM) | 64 |" in summary and "| dmd2 generator | 1 |" in summary
  assert "FD on 600 samples" in summary
  # the generator's row is a fresh 600-sample evaluation, not the loop's last 500-sample one
  exp = setup.build(config, str(tmp_path / "check"), record_config=False)
  fd = exp.evaluator.evaluate(generator, 1, "renoise", final=True)[0]["fd"]
  assert f"| dmd2 generator | 1 | {fd:.4g} |" in summary
  assert "Best evaluated 1-step FD" in summary
  best = ckpt_lib.manager(str(tmp_path / "best"), asynchronous=False)
  assert best.latest_step() in (10, 20)
  assert json.load(open(tmp_path / "config.json"))["dmd"]["variant"] == "dmd2"
  # the exported generator says how it samples (jdistill.sample --checkpoint=generator.msgpack)
  assert json.load(open(tmp_path / "generator.json"))["sampling"] == {"mode": "renoise", "steps": 1,
                                                                   "guidance": 0.0}


def test_step_aware_critic_is_told_which_step_made_each_sample(tmp_path):
  """ids = offset(K) + k + 1 over the step counts in use; only the critic gets the table."""
  _, unify, teacher = _setup(tmp_path, "tdm", unify_steps=(1, 2, 4))
  steps = jnp.array([1, 2, 2, 4, 4, 4, 4])
  t_k = jnp.array([1.0, 1.0, 0.5, 1.0, 0.75, 0.5, 0.25])       # k = 0 | 0, 1 | 0, 1, 2, 3
  np.testing.assert_array_equal(unify.critic_step_ids(steps, t_k), [1, 2, 3, 4, 5, 6, 7])
  _, four, _ = _setup(tmp_path, "dmd2", generator_steps=4)
  np.testing.assert_array_equal(four.critic_step_ids(steps[3:], t_k[3:]), [1, 2, 3, 4])
  state = four.new_state(teacher)
  assert "step_embedding" in state.critic.params["score"] and "step_embedding" not in state.generator.params
  np.testing.assert_array_equal(state.critic.params["score"]["step_embedding"]["embedding"], 0.0)
  _, one, _ = _setup(tmp_path, "dmd2", generator_steps=1)       # one step: nothing to tell
  assert one.critic_step_ids(steps[:1], t_k[:1]) is None
  assert "step_embedding" not in one.new_state(teacher).critic.params["score"]
  _, mixture, _ = _setup(tmp_path, "tdm", generator_steps=4, step_aware_critic=False)
  assert mixture.critic_step_ids(steps[3:], t_k[3:]) is None
  _, told_k, _ = _setup(tmp_path, "tdm", unify_steps=(1, 2, 4), step_aware_critic=False)
  np.testing.assert_array_equal(told_k.critic_step_ids(steps, t_k), steps)   # TDM-unify: K only


@pytest.mark.parametrize("clip_x", [False, True])
def test_tdm_rollout_follows_the_samplers_trajectory(tmp_path, clip_x):
  """Examples rolled out to the last step (k = K - 1) finish exactly as the DDIM sampler does
  with K steps, clipping x_hat to [-1, 1] on the way when the config clips."""
  import dataclasses
  from jdistill.diffusion.sampling import sample
  exp, objective, teacher = _setup(tmp_path, "tdm", generator_steps=4)
  objective = dataclasses.replace(objective, clip_x=clip_x)
  noise = 2.0 * jax.random.normal(jax.random.key(7), (256, 2))     # x_hat often beyond [-1, 1]
  steps = objective.draw_step_counts(jax.random.key(8), 256)
  z_k, t_k = objective.rollout(teacher, noise, None, steps, jax.random.key(9))
  last = np.asarray(t_k) == 0.25
  assert 30 < last.sum() < 100
  x = objective.generate(teacher, z_k, t_k, None, steps)
  sampled = sample(lambda z, logsnr: exp.denoiser.predict(teacher, z, logsnr), exp.schedule, noise, 4,
                   clip_x=clip_x)
  np.testing.assert_allclose((np.clip(x, -1, 1) if clip_x else np.asarray(x))[last],
                             np.asarray(sampled)[last], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- TDM as the paper

def _cosine_alpha_sigma(t):
  """The cosine schedule's closed form: logsnr = -2 log tan(a t + b), alpha = cos, sigma = sin."""
  from jdistill.diffusion.schedules import LOGSNR_MAX, LOGSNR_MIN
  b = np.arctan(np.exp(-0.5 * LOGSNR_MAX))
  a = np.arctan(np.exp(-0.5 * LOGSNR_MIN)) - b
  return np.cos(a * np.asarray(t, np.float64) + b), np.sin(a * np.asarray(t, np.float64) + b)


def test_trajectory_state_diffused_forward_has_the_closed_form_coefficients(tmp_path):
  """z_t = (alpha_t / alpha_s) (alpha_s x + sigma_s eps_hat) + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2
  sigma_s^2) eps: x's coefficient is alpha_t, the noise's add up to sigma_t^2 (the marginal
  N(alpha_t x, sigma_t^2) when eps_hat is Gaussian), and at s = 0 the state is x itself."""
  _, objective, _ = _setup(tmp_path, "tdm", generator_steps=4)
  s = jnp.array([0.75, 0.5, 0.25, 0.1, 0.0, 0.0])
  t = jnp.array([0.9, 0.75, 0.3, 0.1, 0.2, 0.8])
  alpha_s, sigma_s = _cosine_alpha_sigma(s)
  alpha_t, sigma_t = _cosine_alpha_sigma(t)
  alpha_s, sigma_s = np.where(s == 0, 1.0, alpha_s), np.where(s == 0, 0.0, sigma_s)
  coefficient = lambda x, eps_hat, eps: np.asarray(dm.diffuse_trajectory_state(
      jnp.full((6, 1), x), jnp.full((6, 1), eps_hat), objective.schedule(s), objective.schedule(t),
      s, jnp.full((6, 1), eps))[0])[:, 0]
  on_x, on_eps_hat, on_eps = coefficient(1.0, 0.0, 0.0), coefficient(0.0, 1.0, 0.0), coefficient(0.0, 0.0, 1.0)
  np.testing.assert_allclose(on_x, alpha_t, rtol=1e-5)
  np.testing.assert_allclose(on_eps_hat, alpha_t / alpha_s * sigma_s, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(on_eps, np.sqrt(sigma_t**2 - (alpha_t / alpha_s * sigma_s)**2), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(on_eps_hat**2 + on_eps**2, sigma_t**2, rtol=1e-5)
  np.testing.assert_allclose(on_eps_hat[s == 0], 0.0)
  np.testing.assert_allclose(on_eps[s == t], 0.0, atol=1e-3)      # t = s: z_t is z_s
  # eps_mix: z_t = alpha_t x + sigma_t eps_mix
  x, eps_hat, eps = (jax.random.normal(jax.random.key(i), (6, 3)) for i in range(3))
  z_t, eps_mix = dm.diffuse_trajectory_state(x, eps_hat, objective.schedule(s), objective.schedule(t), s, eps)
  np.testing.assert_allclose(z_t, alpha_t[:, None] * x + sigma_t[:, None] * eps_mix, rtol=1e-4, atol=1e-5)


def test_importance_weight_is_the_per_dimension_density_ratio():
  """w = exp(-(||eps_mix||^2 - ||eps||^2) / (2 d)), by hand on a few numbers."""
  eps_mix = jnp.array([[1.0, 0.0], [0.5, -0.5], [2.0, 1.0]])
  eps = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  by_hand = [1.0, np.exp(-(0.5 - 2.0) / 4), np.exp(-(5.0 - 1.0) / 4)]
  np.testing.assert_allclose(dm.trajectory_importance_weight(eps_mix, eps), by_hand, rtol=1e-6)


def test_tdm_and_fresh_noise_differ_at_every_step_but_the_last(tmp_path):
  """The paper's 'tdm' diffuses the trajectory state z_s (with the generator's eps_hat) forward;
  'tdm_fresh_noise' diffuses x_hat with fresh noise. At s = 0 the two are the same draw (weight 1);
  at every other step they differ. With K = 1 the whole losses coincide."""
  _, paper, teacher = _setup(tmp_path, "tdm", generator_steps=4)
  fresh = dataclasses.replace(paper, variant="tdm_fresh_noise")
  steps = paper.draw_step_counts(jax.random.key(0), 64)
  z_k, t_k = paper.rollout(teacher, jax.random.normal(jax.random.key(1), (64, 2)), None, steps,
                           jax.random.key(2))
  generated = paper.generate_step(teacher, z_k, t_k, None, steps)
  z_paper, t_paper, _, weight = paper.noise_generated(generated, t_k, steps, jax.random.key(3))
  z_fresh, t_fresh, _, one = fresh.noise_generated(generated, t_k, steps, jax.random.key(3))
  last = np.asarray(t_k) == 0.25
  assert 5 < last.sum() < 40 and one == 1.0
  np.testing.assert_array_equal(t_paper, t_fresh)
  np.testing.assert_allclose(np.asarray(z_paper)[last], np.asarray(z_fresh)[last], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(weight)[last], 1.0, atol=1e-6)
  assert np.all(np.abs(np.asarray(z_paper) - np.asarray(z_fresh))[~last].max(axis=1) > 1e-4)
  assert np.all(np.abs(np.asarray(weight)[~last] - 1.0) > 1e-7)

  _, one_step, _ = _setup(tmp_path, "tdm", generator_steps=1)
  fresh_one = dataclasses.replace(one_step, variant="tdm_fresh_noise")
  steps = one_step.draw_step_counts(jax.random.key(0), 64)
  z_k = jax.random.normal(jax.random.key(1), (64, 2))
  t_k = jnp.ones((64,))
  critic = perturbed(teacher, 0.05, 6)
  critic = {"score": critic, "gan_head": {}}
  generated = one_step.generate_step(teacher, z_k, t_k, None, steps)
  x_data = jax.random.normal(jax.random.key(7), (64, 2))
  for loss in ("critic_loss", "generator_loss"):
    args = ((critic, generated, x_data, None, steps, t_k, jax.random.key(4)) if loss == "critic_loss"
            else (teacher, critic, teacher, z_k, t_k, None, steps, jax.random.key(4)))
    ours, theirs = getattr(one_step, loss)(*args)[0], getattr(fresh_one, loss)(*args)[0]
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)


def test_tdm_critic_loss_is_importance_weighted(tmp_path):
  """'tdm' critic loss = mean(w * min(SNR, 5) * ||critic(z_t).x - x_hat||^2), z_t from the trajectory
  state, by hand from the same draws."""
  from jdistill.diffusion.losses import weighted_x_loss
  _, objective, teacher = _setup(tmp_path, "tdm", generator_steps=4)
  steps = jnp.full((32,), 4)
  t_k = jnp.tile(jnp.array([1.0, 0.75, 0.5, 0.25]), 8)
  z_k = jax.random.normal(jax.random.key(1), (32, 2))
  generated = objective.generate_step(teacher, z_k, t_k, None, steps)
  critic = jax.tree.map(lambda p: p * 1.05, teacher)
  rng = jax.random.key(5)
  loss, _ = objective.critic_loss({"score": critic, "gan_head": {}}, generated, None, None, steps, t_k, rng)
  rng_noise, _ = jax.random.split(rng)
  rng_t, rng_eps = jax.random.split(rng_noise)
  t = jax.random.uniform(rng_t, (32,), minval=t_k - 0.25, maxval=t_k)
  eps = jax.random.normal(rng_eps, (32, 2))
  s = t_k - 0.25
  z_t, eps_mix = dm.diffuse_trajectory_state(generated.x0, generated.eps, objective.schedule(s),
                                             objective.schedule(t), s, eps)
  weight = np.exp(-0.5 * (np.mean(np.asarray(eps_mix)**2, 1) - np.mean(np.asarray(eps)**2, 1)))
  ids = objective.critic_step_ids(steps, t_k)
  x_critic = objective.denoiser.predict(critic, z_t, objective.schedule(t), steps=ids).x0
  by_hand = np.mean(weight * weighted_x_loss(x_critic, generated.x0, objective.schedule(t), "min_snr", 5.0))
  np.testing.assert_allclose(float(loss), by_hand, rtol=1e-5)


def test_gan_noises_real_and_fake_at_their_own_levels(tmp_path):
  """The critic's GAN loss diffuses the real and the generated batch with separate draws of t and
  noise (DMD2 noises each independently)."""
  _, objective, teacher = _setup(tmp_path, "dmd2", gan_weight=0.1)
  seen = []

  class Recording(type(objective)):
    def gan_logit(self, critic_params, z_t, t, label):
      seen.append((np.asarray(z_t), np.asarray(t)))
      return super().gan_logit(critic_params, z_t, t, label)

  recording = Recording(**{f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)})
  critic = recording.new_state(teacher).critic.params
  steps = jnp.ones((16,), jnp.int32)
  x = jnp.zeros((16, 2))
  generated = recording.generate_step(teacher, jax.random.normal(jax.random.key(0), (16, 2)),
                                      jnp.ones((16,)), None, steps)
  recording.critic_loss(critic, generated._replace(x0=x), x, None, steps, jnp.ones((16,)),
                        jax.random.key(1))
  (z_real, t_real), (z_fake, t_fake) = seen
  assert np.abs(t_real - t_fake).min() > 0 and np.abs(z_real - z_fake).min() > 0


def test_presets_paper_dmd2_and_both_tdm_variants_validate():
  from configs import dmd as dmd_configs
  from configs import tdm as tdm_configs
  from jdistill.errors import ConfigError
  from jdistill.methods import validate
  paper = dmd_configs.get_config("digits_paper")
  assert (paper.dmd.regression_weight, paper.dmd.critic_updates_per_generator) == (0.0, 5)
  assert paper.dmd.gan_weight > 0 and paper.preset == "digits"
  assert (paper.optim.name, paper.optim.b1, paper.optim.b2, paper.optim.weight_decay) == ("adamw", 0.9, 0.999, 0.01)
  default = dmd_configs.get_config("digits")
  assert (default.dmd.regression_weight, default.dmd.critic_updates_per_generator, default.optim.name) == (1.0, 2, "adam")
  tdm, fresh = tdm_configs.get_config("digits"), tdm_configs.get_config("digits_fresh_noise")
  assert (tdm.dmd.variant, tdm.dmd.huber_c) == ("tdm", 1e-3)
  assert (fresh.dmd.variant, fresh.dmd.huber_c) == ("tdm_fresh_noise", 0.03)
  for config in (paper, default, tdm, fresh, dmd_configs.get_config("toy2d_paper"),
                 tdm_configs.get_config("toy2d_fresh_noise")):
    validate(config, 1)
  fresh.dmd.huber_c = 0.0
  with pytest.raises(ConfigError, match=r"config.dmd.huber_c: must be > 0"):
    validate(fresh, 1)
  with pytest.raises(ConfigError, match=r"dmd.variant"):
    dm_method.get_config("digits", "tdm_paper")


@pytest.mark.parametrize("variant", ["tdm", "tdm_fresh_noise"])
def test_tdm_variants_train_finite(tmp_path, variant):
  exp, objective, teacher = _setup(tmp_path, variant, critic_updates_per_generator=1)
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(teacher)
  before = jax.device_get(state.generator.params)
  for i, batch in enumerate(_batches(exp, 2)):
    state, metrics = compiled.fn(state, batch, jax.random.key(i), dm.DistributionMatchingFrozen(teacher=teacher), None)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["generator_updated"]) == 1.0 and float(metrics["critic_loss"]) > 0
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(jax.device_get(state.generator.params)), jax.tree.leaves(before))]
  assert max(moved) > 0
