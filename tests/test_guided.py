"""Guided distillation (guidance-conditioned students): the stage-1 target and loss against hand
computations, the student starting as the conditional teacher at every w, the sampler telling the
network its w, CFG applied twice refused, stage 2's targets at the example's w, and the two stages
run end to end from a tiny class-conditional teacher."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from flax import serialization

from jdistill import methods
from jdistill.config import base_config
from jdistill.diffusion import sampling
from jdistill.diffusion.schedules import make_schedule
from jdistill.errors import ConfigError
from jdistill.eval.evaluate import Sampler
from jdistill.methods import guided as guided_method
from jdistill.models.denoiser import make_denoiser, with_guidance_embedding
from jdistill.objectives.guided import GuidedObjective
from jdistill.objectives.progressive import ProgressiveObjective, make_stage, nested_grids
from jdistill.objectives import state as state_lib
from jdistill import sample as sample_cli

from conftest import tiny_teacher_params, tiny_unet

SHAPE = (8, 8, 1)


def _conditional(preset="digits_cond", name="unet"):
  """(config, denoiser, teacher params): a tiny class-conditional model whose outputs depend on z,
  the time and the label (numpy params: no init to compile)."""
  config = tiny_unet(base_config(preset))
  if name == "dit":
    config.model.update(name="dit", channels=16, num_heads=2, depth=2, patch_size=2)
  denoiser = make_denoiser(config.model, SHAPE, "v", "flow" if preset.endswith("_flow") else "vp")
  return config, denoiser, jax.tree.map(jnp.asarray, tiny_teacher_params(config, 0))


def _guided_student(denoiser, teacher, scale=0.3):
  """The teacher plus a guidance embedding drawn away from zero, so w changes the output."""
  student = with_guidance_embedding(denoiser, teacher, jnp.zeros((1, *SHAPE)))
  embedding = jax.tree.map(lambda p: scale * jax.random.normal(jax.random.key(7), p.shape),
                           student["guidance_embedding"])
  return {**student, "guidance_embedding": embedding}


def _inputs(n=4):
  z = jax.random.normal(jax.random.key(2), (n, *SHAPE))
  return z, jnp.linspace(-4.0, 4.0, n), jnp.arange(n, dtype=jnp.int32) % 10


@pytest.mark.parametrize("preset", ["digits_cond", "digits_cond_flow"])
def test_stage1_target_and_loss_against_a_hand_computation(preset):
  config, denoiser, teacher = _conditional(preset)
  objective = GuidedObjective(denoiser, make_schedule(config.diffusion.schedule),
                              state_lib.make_optimizer(config.optim), config.optim, 10, SHAPE,
                              guidance_range=(0.0, 4.0), weighting=config.diffusion.loss_weighting)
  batch = {"x": jax.random.uniform(jax.random.key(3), (6, *SHAPE), minval=-1, maxval=1),
           "label": jnp.arange(6, dtype=jnp.int32)}
  targets, predict = jax.jit(objective.targets), jax.jit(denoiser.predict)
  z_t, logsnr, label, w, x_w = targets(teacher, batch, jax.random.key(4))
  assert float(w.min()) >= 0.0 and float(w.max()) <= 4.0 and float(jnp.std(w)) > 0.1
  # (1 + w) x(z_t, c) - w x(z_t, null), from two separate passes
  x_c = predict(teacher, z_t, logsnr, label).x0
  x_null = predict(teacher, z_t, logsnr, jnp.full_like(label, 10)).x0
  w_ = w[:, None, None, None]
  np.testing.assert_allclose(x_w, (1 + w_) * x_c - w_ * x_null, atol=2e-5)
  assert float(jnp.abs(x_w - x_c).max()) > 1e-3             # the guidance matters

  student = _guided_student(denoiser, teacher)
  loss, _ = jax.jit(objective.loss)(student, teacher, batch, jax.random.key(5))
  rng_target, _ = jax.random.split(jax.random.key(5))
  z_t, logsnr, label, w, x_w = targets(teacher, batch, rng_target)
  x_s = predict(student, z_t, logsnr, label, guidance=w).x0
  snr = jnp.exp(logsnr)
  # v_mse: ||v - v_w||^2 = (1 + snr) ||x - x_w||^2 (VP); flow_v_mse: ||x - x_w||^2 / tau^2
  tau = 1.0 / (1.0 + jnp.exp(logsnr / 2))
  weight = 1.0 + snr if preset == "digits_cond" else 1.0 / tau**2
  hand = jnp.mean(weight * jnp.mean((x_s - x_w) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(float(loss), float(hand), rtol=1e-4)


@pytest.mark.parametrize("name", ["unet", "dit"])
def test_the_student_at_init_is_the_conditional_teacher_at_every_w(name):
  config, denoiser, teacher = _conditional(name=name)
  objective = GuidedObjective(denoiser, make_schedule(config.diffusion.schedule),
                              state_lib.make_optimizer(config.optim), config.optim, 10, SHAPE)
  student = objective.new_state(teacher).params
  z, logsnr, label = _inputs()
  predict = jax.jit(denoiser.predict)
  conditional = predict(teacher, z, logsnr, label).x0
  for w in (0.0, 1.5, 4.0):
    np.testing.assert_array_equal(predict(student, z, logsnr, label, guidance=w).x0, conditional)


def test_the_samplers_w_reaches_the_network_in_one_pass():
  config, denoiser, teacher = _conditional()
  student = _guided_student(denoiser, teacher)
  schedule = make_schedule(config.diffusion.schedule)
  sampler = Sampler(denoiser, schedule, SHAPE, batch_size=8)
  labels = np.arange(8) % 10
  noise = jax.random.normal(jax.random.key(0), (8, *SHAPE))
  for w in (0.0, 3.0):
    by_hand = jax.jit(lambda w: sampling.sample(
        lambda z, logsnr: denoiser.predict(student, z, logsnr, jnp.asarray(labels), guidance=w),
        schedule, noise, 4))(w)
    np.testing.assert_allclose(sampler.sample(student, 4, 8, labels=labels, guidance=w), by_hand,
                               atol=1e-5)
  assert np.abs(sampler.sample(student, 4, 8, labels=labels, guidance=3.0)
                - sampler.sample(student, 4, 8, labels=labels, guidance=0.0)).max() > 1e-3
  # the plain teacher at w: two-pass CFG, which is not the student's one pass
  cfg = sampler.sample(teacher, 4, 8, labels=labels, guidance=3.0)
  assert np.abs(cfg - sampler.sample(student, 4, 8, labels=labels, guidance=3.0)).max() > 1e-3


def test_cfg_applied_twice_and_guidance_for_a_model_trained_for_neither_are_errors():
  _, denoiser, teacher = _conditional()
  student = _guided_student(denoiser, teacher)
  z, logsnr, label = _inputs()
  with pytest.raises(ValueError, match="applied twice"):
    denoiser.predict_guided(student, z, logsnr, label, 2.0)
  with pytest.raises(ValueError, match="without a guidance embedding"):
    denoiser.predict(teacher, z, logsnr, label, guidance=2.0)
  # jdistill.sample --guidance: told to a guided student, two passes for a CFG teacher, else refused
  assert sample_cli.check_guidance(2.0, guided_method.get_config(), {}) is True
  assert sample_cli.check_guidance(2.0, methods.get("teacher").get_config("digits"),
                                   {"guided": True}) is True
  assert sample_cli.check_guidance(2.0, methods.get("teacher").get_config("digits_cond"), {}) is False
  for config in (methods.get("progressive").get_config("digits_cond"),    # a distilled student
                 methods.get("teacher").get_config("digits")):            # unconditional
    with pytest.raises(app.UsageError, match="trained for neither"):
      sample_cli.check_guidance(2.0, config, {})
    assert sample_cli.check_guidance(0.0, config, {}) is False


def test_stage2_targets_are_the_guided_teachers_chain_at_the_examples_w():
  config, denoiser, teacher = _conditional()
  teacher = _guided_student(denoiser, teacher)            # stage 2's teacher: a guided student
  schedule = make_schedule(config.diffusion.schedule)
  stage = make_stage(nested_grids([4, 2, 1]), 0, 10)
  batch = {"x": jax.random.uniform(jax.random.key(3), (4, *SHAPE), minval=-1, maxval=1),
           "label": jnp.arange(4, dtype=jnp.int32)}
  i = jnp.array([0, 1, 0, 1])

  def targets(w):
    objective = ProgressiveObjective(denoiser, schedule, None, config.optim, SHAPE,
                                     guidance_range=(w, w))
    return jax.jit(objective.targets)(teacher, batch, jax.random.key(4), i, stage)

  z_t, logsnr_t, x_target, label, w = targets(2.5)
  np.testing.assert_allclose(w, 2.5)

  @jax.jit
  def by_hand(z_t, logsnr_t):
    """The teacher's two DDIM steps at w = 2.5 from t = t_{i+1} to s = t_i (grid i / 2)."""
    t, s = (i + 1) / 2.0, i / 2.0
    pred = denoiser.predict(teacher, z_t, logsnr_t, label, guidance=2.5)
    mid = (t + s) / 2
    z_mid = sampling.ddim_step(pred, schedule(mid))
    pred_mid = denoiser.predict(teacher, z_mid, schedule(mid), label, guidance=2.5)
    z_s = sampling.ddim_step(pred_mid, schedule(s))
    return sampling.ddim_x_target(z_t, z_s, pred_mid.x0, logsnr_t, schedule(s), s)
  hand = by_hand(z_t, logsnr_t)
  np.testing.assert_allclose(x_target, hand, atol=2e-5)
  assert float(jnp.abs(targets(0.0)[2] - x_target).max()) > 1e-3


def test_validation_names_the_field():
  def config_with(**changes):
    config = guided_method.get_config()
    for field, value in changes.items():
      section, key = field.split(".")
      config[section][key] = value
    return config
  for changes, field in [({"model.num_classes": 0}, "model.num_classes"),
                         ({"diffusion.label_dropout": 0.0}, "diffusion.label_dropout"),
                         ({"student_guidance.w_max": 0.0}, "student_guidance.w_max"),
                         ({"student_guidance.w_min": 5.0}, "student_guidance.w_min"),
                         ({"guided.stage2_eval_steps": (3,)}, "guided.stage2_eval_steps"),
                         ({"model.name": "diffusers_unet"}, "model.name")]:
    with pytest.raises(ConfigError, match=field):
      methods.validate(config_with(**changes), 1)
  methods.validate(guided_method.get_config(), 1)


def test_both_stages_run_end_to_end_and_the_student_samples_at_any_w(tmp_path):
  config = tiny_unet(guided_method.get_config())
  teacher_path = str(tmp_path / "teacher.msgpack")
  with open(teacher_path, "wb") as f:
    f.write(serialization.to_bytes(tiny_teacher_params(config, 0)))
  config.teacher.update(checkpoint=teacher_path, sampling_steps=4)
  config.data.batch_size = 16
  config.progressive.update(steps="", stage_overrides="", steps_per_stage=4, validation_examples=0)
  config.guided.update(train_steps=4, eval_steps=(4,), stage2_eval_steps=(2, 1))
  config.student_guidance.summary_w = (0.0, 2.0)
  config.train.update(log_every=2, save_every=100)
  config.eval.update(num_samples=64, batch_size=64, neighbour_examples=64)
  workdir = str(tmp_path / "run")
  student = methods.train(config, workdir)
  summary = open(os.path.join(workdir, "summary.md")).read()
  for row in ("| CFG teacher (2 passes) | 4 | 2 |", "| guided student | 4 | 0 |",
              "| stage-2 student | 1 | 2 |"):
    assert row in summary
  assert "accuracy" in summary
  exported = json.load(open(os.path.join(workdir, "student.json")))
  assert exported["sampling"]["guided"] is True and exported["sampling"]["steps"] == 1
  # jdistill.sample's loading of the exported student, then one pass per step at each w
  from jdistill.train import setup
  exp = setup.build(sample_cli.config_of_export(exported), workdir, evaluator=False,
                    record_config=False)
  params = sample_cli.load_params(exp, os.path.join(workdir, "student.msgpack"), guided=True)
  chex_equal = jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, student)
  del chex_equal
  assert np.isfinite(exp.sampler.sample(params, 1, 8, guidance=4.0)).all()


def _dmd_objective(w_range, variant="dmd2"):
  from jdistill.methods import distribution_matching as dm_method
  from jdistill.objectives.distribution_matching import DistributionMatchingObjective
  config, denoiser, teacher = _conditional()
  schedule = make_schedule(config.diffusion.schedule)
  optimizer = state_lib.make_optimizer(config.optim)
  objective = DistributionMatchingObjective(
      denoiser, schedule, optimizer, optimizer, config.optim, config.optim, SHAPE, 10,
      variant=variant, guidance_range=w_range)
  del dm_method
  return objective, denoiser, teacher


@pytest.mark.parametrize("variant", ["dmd2", "tdm"])
def test_dmd_real_score_is_the_teachers_cfg_at_the_examples_w(variant):
  """Generator and critic start as the conditional teacher at every w (zero guidance embeddings),
  so the distribution-matching gradient vanishes at w = 0 (real score = fake score) and not at
  w = 2, where the real score is the teacher's two-pass CFG."""
  def grad_norm(w):
    objective, denoiser, teacher = _dmd_objective((w, w), variant)
    state = objective.new_state(teacher)
    generator, critic = state.generator.params, state.critic.params
    assert "guidance_embedding" in generator and "guidance_embedding" in critic["score"]
    noise = jax.random.normal(jax.random.key(3), (8, *SHAPE))
    label = jnp.arange(8, dtype=jnp.int32)
    steps = jnp.full((8,), 1, jnp.int32)
    w_ = jnp.full((8,), w)
    z_k, t_k = jax.jit(objective.rollout)(generator, noise, label, steps, jax.random.key(4), w_)
    grads = jax.jit(jax.grad(lambda p: objective.generator_loss(
        p, critic, teacher, z_k, t_k, label, steps, jax.random.key(5), w=w_)[0]))(generator)
    return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  # at w = 0 the two-pass CFG equals one conditional pass up to rounding (its batch is doubled)
  assert grad_norm(0.0) < 2e-5
  assert grad_norm(2.0) > 1e-3


def guided_run(config, tmp_path, export: str, batch_size: int, num_steps: int):
  """`config` (a method's digits_cond config, tiny U-Net) run for `num_steps` with w ~ U[0, 4] from
  a random tiny teacher (4 steps), tabled at w = 0 and 3: (summary.md, its export's JSON)."""
  teacher_path = str(tmp_path / "teacher.msgpack")
  with open(teacher_path, "wb") as f:
    f.write(serialization.to_bytes(tiny_teacher_params(config, 0)))
  config.teacher.update(checkpoint=teacher_path, sampling_steps=4)
  config.student_guidance.update(w_max=4.0, summary_w=(0.0, 3.0))
  config.data.batch_size = batch_size
  config.train.update(num_steps=num_steps, log_every=1, save_every=100, eval_every=0)
  config.eval.update(num_samples=64, batch_size=64, final_num_samples=0, neighbour_examples=64)
  workdir = str(tmp_path / "run")
  methods.train(config, workdir)
  return (open(os.path.join(workdir, "summary.md")).read(),
          json.load(open(os.path.join(workdir, export))))


def test_dmd_with_a_guidance_conditioned_generator_runs_and_tables_every_w(tmp_path):
  from jdistill.methods import distribution_matching as dm_method
  config = tiny_unet(dm_method.get_config("digits_cond"))
  config.dmd.update(regression_pairs=32, regression_steps=4, eval_steps=(1,))
  summary, exported = guided_run(config, tmp_path, "generator.json", 16, 4)
  for row in ("| CFG teacher (2 passes) | 4 | 3 |", "| dmd2 generator | 1 | 0 |",
              "| dmd2 generator | 1 | 3 |"):
    assert row in summary
  assert exported["sampling"]["guided"] is True
  # the control is refused where a method does not take it
  config = tiny_unet(methods.get("teacher").get_config("digits_cond"))
  config.student_guidance.w_max = 4.0
  with pytest.raises(ConfigError, match="student_guidance.w_max.*does not support"):
    methods.validate(config, 1)


@pytest.mark.parametrize("method,variant,row", [("consistency", "scd", "sCD student"),
                                                ("consistency", "cd", "CD student"),
                                                ("meanflow", None, "MeanFlow")])
def test_a_guidance_conditioned_consistency_or_flow_map_student_runs_and_tables_every_w(
    tmp_path, method, variant, row):
  config = tiny_unet(methods.get(method).get_config("digits_cond"))
  if variant:
    config.consistency.variant = variant
  config[method].eval_steps = (1,)
  summary, exported = guided_run(config, tmp_path, "student.json", 8, 3)
  for line in ("| CFG teacher (2 passes) | 4 | 3 |", f"| {row} | 1 | 0 |", f"| {row} | 1 | 3 |"):
    assert line in summary
  assert exported["sampling"]["guided"] is True and exported["sampling"]["guidance"] == 2.0
