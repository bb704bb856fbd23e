"""Progressive distillation: the target formula, the exact-denoiser identity, a 3-stage run,
one compilation for all stages, and mid-stage resume == unbroken."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from jdistill.config import base_config
from jdistill.data import pipeline
from jdistill.diffusion import parameterization as P
from jdistill.diffusion import sampling, schedules
from jdistill.objectives import progressive as progressive_math
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, teachers as teacher_lib
from jdistill import methods

from test_diffusion import exact_gaussian_denoiser, schedule


def test_x_target_against_hand_computation():
  z_t, z_s = np.array([[0.8, -0.3]]), np.array([[0.5, 0.1]])
  lt, ls = -0.5, 1.5
  at, st = (float(v) for v in schedules.alpha_sigma(lt))
  as_, ss = (float(v) for v in schedules.alpha_sigma(ls))
  expected = (z_s - ss / st * z_t) / (as_ - ss / st * at)
  got = sampling.ddim_x_target(jnp.asarray(z_t), jnp.asarray(z_s), jnp.zeros((1, 2)),
                                     jnp.array([lt]), jnp.array([ls]), jnp.array([0.25]))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  teacher_x = jnp.array([[0.9, 0.9]])
  at_end = sampling.ddim_x_target(jnp.asarray(z_t), jnp.asarray(z_s), teacher_x,
                                        jnp.array([lt]), jnp.array([20.0]), jnp.array([0.0]))
  np.testing.assert_allclose(at_end, teacher_x)


def test_two_step_target_reproduces_two_exact_ddim_steps():
  """With the exact denoiser of Gaussian data, one student DDIM step with x_target lands exactly
  on two teacher DDIM steps t -> t - 1/2N -> t - 1/N."""
  sched = schedule()
  n = 4
  z_t = jax.random.normal(jax.random.key(0), (64, 3))
  i = jnp.arange(64) % n
  t, s = (i + 1) / n, i / n
  u = t - 0.5 / n
  z_u = sampling.ddim_step(exact_gaussian_denoiser(z_t, sched(t)), sched(u))
  z_s_manual = sampling.ddim_step(exact_gaussian_denoiser(z_u, sched(u)), sched(s))
  z_s, teacher_x = sampling.ddim_segment(exact_gaussian_denoiser, sched, z_t, t, s, jnp.int32(2))
  np.testing.assert_allclose(z_s, z_s_manual, atol=1e-5)
  x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, sched(t), sched(s), s)
  student = P.from_x0(x_target, z_t, sched(t))
  z_s_student = sampling.ddim_step(student, sched(s))
  interior = np.asarray(s > 0)
  np.testing.assert_allclose(np.asarray(z_s_student)[interior], np.asarray(z_s)[interior], atol=1e-4)
  # the last student step (s = 0) returns the teacher's x prediction, i.e. the teacher's sample
  np.testing.assert_allclose(np.asarray(z_s_student)[~interior], np.asarray(z_s)[~interior], atol=1e-3)


SCHEDULE_25 = [25, 13, 7, 4, 2, 1]
GRIDS_25 = [list(range(26)),                                     # by hand: see nested_grids
            [0, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25],   # single step at the low end (tie)
            [0, 3, 7, 11, 15, 19, 23, 25],                       # widths 1 < 2: at the high end
            [0, 3, 11, 19, 25],                                  # widths 3 > 2: at the low end
            [0, 11, 25],
            [0, 25]]


def test_grids_nest_for_25_13_7_4_2_1():
  grids = progressive_math.nested_grids(SCHEDULE_25)
  assert grids == GRIDS_25
  for teacher, student in zip(grids, grids[1:]):
    assert set(student) <= set(teacher)
    spans = np.diff([teacher.index(p) for p in student])       # teacher steps per student step
    assert spans.max() == 2 and spans.sum() == len(teacher) - 1
    assert (spans == 1).sum() == (len(teacher) - 1) % 2                # one single step iff odd
  # every stage's student sits on the grid its traced stage gives the train step
  for k in range(5):
    stage = progressive_math.make_stage(grids, k, 10)
    n = int(stage.student_steps)
    np.testing.assert_array_equal(progressive_math.student_grid(stage)[:n + 1],
                                  np.float32(np.asarray(grids[k + 1]) / 25))
    assert int(stage.teacher_substeps) == 2


def test_strict_halving_grids_are_the_uniform_grids_bit_for_bit():
  steps = [64, 32, 16, 8, 4, 2, 1]
  grids = progressive_math.nested_grids(steps)
  assert grids == [list(range(0, 65, 64 // n)) for n in steps]
  sched = schedule()
  z_t = jax.random.normal(jax.random.key(0), (32, 3))
  sampler = _exact_sampler(sched)
  compiled = sampler._sample_batch._cache_size()       # (jit's cache is shared by every Sampler)
  for k, n in enumerate(steps[1:]):
    stage = progressive_math.make_stage(grids, k, 10)
    i = jnp.arange(32) % n
    t, s = progressive_math.student_step_times(stage, i)
    old_t = (i + 1).astype(jnp.float32) / jnp.float32(n)          # the uniform grid's times
    old_s = i.astype(jnp.float32) / jnp.float32(n)
    np.testing.assert_array_equal(t, old_t)
    np.testing.assert_array_equal(s, old_s)
    chain = progressive_math.teacher_chain(exact_gaussian_denoiser, sched, z_t, i, stage)
    uniform = sampling.ddim_segment(exact_gaussian_denoiser, sched, z_t, old_t, old_s, jnp.int32(2))
    for a, b in zip(chain, uniform):
      np.testing.assert_array_equal(a, b)
    # the evaluator samples a uniform grid exactly as it sampled before grids existed
    np.testing.assert_array_equal(sampler.sample(None, n, 8, grid=np.asarray(grids[k + 1]) / 64),
                                  sampler.sample(None, n, 8))
  assert sampler._sample_batch._cache_size() == compiled + 1      # no grid program compiled


def _exact_sampler(sched):
  """The evaluator's Sampler over the exact Gaussian denoiser (3-D data)."""
  from jdistill.eval.evaluate import Sampler

  from jdistill.models.denoiser import Denoiser

  class Exact(Denoiser):
    def predict_with_guidance(self, params, z, logsnr, *unused, **unused_keywords):
      return exact_gaussian_denoiser(z, logsnr)
  return Sampler(Exact(module=None, parameterization="x"), sched, (3,), clip_x=False, batch_size=8)


def test_sampler_follows_a_grid_with_one_compilation_for_every_grid():
  sched = schedule()
  sampler = _exact_sampler(sched)
  compiled = sampler._sample_batch._cache_size()
  noise = np.asarray(jax.random.normal(jax.random.key(0), (8, 3)))
  for steps in (13, 7):
    grid = np.asarray(GRIDS_25[SCHEDULE_25.index(steps)]) / 25
    by_hand = noise
    for i in range(steps, 0, -1):       # DDIM t_i -> t_{i-1}; the last step returns x itself
      pred = exact_gaussian_denoiser(by_hand, sched(jnp.full((8,), grid[i])))
      by_hand = pred.x0 if i == 1 else sampling.ddim_step(pred, sched(jnp.full((8,), grid[i - 1])))
    np.testing.assert_allclose(sampler.sample(None, steps, 8, grid=grid), by_hand, atol=1e-5)
    assert not np.allclose(sampler.sample(None, steps, 8), by_hand, atol=1e-3)   # uniform differs
  assert sampler._sample_batch._cache_size() == compiled + 2     # every grid, and uniform
  with pytest.raises(ValueError, match="7 steps need 8 time points"):
    sampler.sample(None, 7, 8, grid=[0.0, 1.0])
  with pytest.raises(ValueError, match="rise strictly from 0 to 1"):
    sampler.sample(None, 2, 8, grid=[0.0, 0.7, 0.5])


def test_two_step_target_is_exact_on_nonuniform_segments():
  """Stage 1 of 25,13,7,...: the 13-step teacher's grid is not uniform, the 7-step student's steps
  span 3/25, 4/25 and 2/25. One student DDIM step with x_target lands on the teacher's two (or,
  at the single step, one) exact DDIM steps over its own grid points."""
  sched = schedule()
  grids = progressive_math.nested_grids(SCHEDULE_25)
  stage = progressive_math.make_stage(grids, 1, 10)
  teacher_times = np.asarray(grids[1]) / 25
  z_t = jax.random.normal(jax.random.key(0), (7, 3))
  i = jnp.arange(7)
  z_s, teacher_x = progressive_math.teacher_chain(exact_gaussian_denoiser, sched, z_t, i, stage)
  t, s = progressive_math.student_step_times(stage, i)
  np.testing.assert_allclose(t, [3 / 25, 7 / 25, 11 / 25, 15 / 25, 19 / 25, 23 / 25, 1], rtol=1e-6)
  for row in range(7):                    # by hand: DDIM over the teacher's points in [s, t]
    points = [p for p in teacher_times if s[row] - 1e-6 <= p <= t[row] + 1e-6][::-1]
    assert len(points) == (2 if row == 6 else 3)        # the last step spans one teacher step
    z = z_t[row:row + 1]
    for a, b in zip(points, points[1:]):
      pred = exact_gaussian_denoiser(z, sched(jnp.array([a])))
      z = sampling.ddim_step(pred, sched(jnp.array([b])))
    np.testing.assert_allclose(z_s[row:row + 1], z, atol=1e-5)
  x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, sched(t), sched(s), s)
  student = P.from_x0(x_target, z_t, sched(t))
  interior = np.asarray(s > 0)
  np.testing.assert_allclose(np.asarray(sampling.ddim_step(student, sched(s)))[interior],
                             np.asarray(z_s)[interior], atol=1e-4)
  np.testing.assert_allclose(np.asarray(student.x0)[~interior], np.asarray(teacher_x)[~interior])


def _distilled(teacher_predict, sched, stage):
  """The exact distillation of `teacher_predict` into `stage`'s student: at its grid point t_{i+1}
  it predicts x_target of the teacher's chain over [t_i, t_{i+1}]; NaN when asked at any other time
  (a student only learned its own grid)."""
  n = int(stage.student_steps)
  logsnrs = sched(progressive_math.student_grid(stage)[1:n + 1])

  def predict(z, logsnr):
    distance = jnp.abs(logsnr[:, None] - logsnrs[None])
    i = jnp.argmin(distance, axis=1)
    t, s = progressive_math.student_step_times(stage, i)
    z_s, teacher_x = progressive_math.teacher_chain(teacher_predict, sched, z, i, stage)
    x = sampling.ddim_x_target(z, z_s, teacher_x, sched(t), sched(s), s)
    off_grid = P.broadcast_to_data(jnp.min(distance, axis=1) > 1e-4, z)
    return P.from_x0(jnp.where(off_grid, jnp.nan, x), z, logsnr)
  return predict


@pytest.mark.parametrize("two_step", [True, False])
def test_nested_students_sample_the_25_step_teacher_chain(two_step):
  """Each student of 25,13,7,4,2,1, defined as the exact distillation of its teacher (two-step: the
  previous student; direct: the 25-step original), sampled on its own nested grid reproduces the
  25-step DDIM chain of the exact Gaussian denoiser; no teacher is ever asked off its grid."""
  sched = schedule()
  grids = progressive_math.nested_grids(SCHEDULE_25)
  noise = jax.random.normal(jax.random.key(3), (16, 2))
  chain_25 = sampling.sample(exact_gaussian_denoiser, sched, noise, 25, clip_x=False)
  teacher = exact_gaussian_denoiser
  for k, n in enumerate(SCHEDULE_25[1:]):
    stage = progressive_math.make_stage(grids, k, 10, two_step)
    student = _distilled(teacher if two_step else exact_gaussian_denoiser, sched, stage)
    grid = sampling.padded_grid(np.asarray(grids[k + 1]) / 25, n)
    x = sampling.sample(student, sched, noise, n, clip_x=False, grid=grid)
    np.testing.assert_allclose(x, chain_25, atol=2e-4, err_msg=f"{n}-step student")
    teacher = student


def test_direct_variant_spans_every_original_teacher_step():
  """Direct: each student step's target chain runs over the original 25-step teacher's grid points
  inside it, 25 steps over a full chain."""
  grids = progressive_math.nested_grids(SCHEDULE_25)
  expected = {13: [1] + [2] * 12, 7: [3, 4, 4, 4, 4, 4, 2], 4: [3, 8, 8, 6], 2: [11, 14], 1: [25]}
  for k, n in enumerate(SCHEDULE_25[1:]):
    stage = progressive_math.make_stage(grids, k, 10, two_step=False)
    np.testing.assert_array_equal(stage.teacher_grid, np.float32(np.arange(26) / 25))
    points = np.asarray(stage.student_points)[:n + 1]
    assert np.diff(points).tolist() == expected[n] and np.diff(points).sum() == 25
    assert int(stage.teacher_substeps) == max(expected[n])
    two_step = progressive_math.make_stage(grids, k, 10)
    np.testing.assert_array_equal(progressive_math.student_grid(stage)[:n + 1],
                                  progressive_math.student_grid(two_step)[:n + 1])


def _toy_config(workdir_teacher=None):
  config = base_config("toy2d")
  config.model.update(channels=32, num_res_blocks=1)
  config.data.batch_size = 64
  config.eval.update(num_samples=256, batch_size=256, final_steps=(8, 1), steps_during_training=(8,))
  return config


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = _toy_config()
  config.method = "teacher"
  config.train.update(num_steps=300, log_every=100, save_every=300, eval_every=0)
  methods.train(config, workdir)
  return workdir


def _progressive_config(teacher_dir):
  import configs.progressive as progressive_config  # noqa: F401 - the real config file
  config = progressive_config.get_config("toy2d")
  config.model.update(channels=32, num_res_blocks=1)
  config.data.batch_size = 64
  config.eval.update(num_samples=256, batch_size=256)
  config.teacher.checkpoint = teacher_dir
  config.progressive.update(steps="8,4,2,1", steps_per_stage=60)
  config.train.update(log_every=20, save_every=20)
  return config


def _run(config, workdir, monkeypatch=None, crash_after_batches=None):
  """Runs the progressive driver; records every CompiledStep it builds."""
  built = []
  original = loop.compile_step

  def recording(*args, **kwargs):
    built.append(original(*args, **kwargs))
    return built[-1]

  patches = [(loop, "compile_step", recording)]
  if crash_after_batches is not None:
    calls = {"n": 0}
    to_global = pipeline.to_global

    def crashing(batch, sharding):
      calls["n"] += 1
      if calls["n"] > crash_after_batches:
        raise KeyboardInterrupt("simulated preemption")
      return to_global(batch, sharding)
    patches.append((pipeline, "to_global", crashing))
  with pytest.MonkeyPatch.context() as mp:
    for obj, name, value in patches:
      mp.setattr(obj, name, value)
    params = methods.train(config, workdir)
  return params, built


def _scalars(workdir, tag):
  values = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values.append((event.step, float(tf.make_ndarray(value.tensor))))
  return [v for _, v in sorted(values)]


@pytest.fixture(scope="module")
def unbroken(toy_teacher, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("progressive"))
  params, built = _run(_progressive_config(toy_teacher), workdir)
  return workdir, params, built


def test_three_stages_checkpoint_and_reduce_their_loss(unbroken):
  workdir, _, _ = unbroken
  for k, n in enumerate((4, 2, 1)):
    stage = os.path.join(workdir, "stages", f"{k}_{n}steps")
    assert ckpt_lib.manager(os.path.join(stage, "checkpoints"), asynchronous=False).latest_step() == 60
    assert ckpt_lib.manager(os.path.join(stage, "best"), asynchronous=False).latest_step() is not None
    with open(os.path.join(stage, "result.json")) as f:
      row = json.load(f)
    # speed is a benchmark's business, not a test's: only check the field is reported
    assert row["steps"] == n and np.isfinite(row["student_fd"]) and row["speedup"] > 0
    # every evaluation's nearest-neighbour metrics and FD to the teacher, in the row and TensorBoard
    assert 0 <= row["memorised"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
    assert np.isfinite(row["fd_teacher"])
    for metric in ("memorised", "precision", "recall", "fd_teacher"):
      assert len(_scalars(workdir, f"stage{k}_{n}steps/{metric}")) >= 1, metric
    assert row["grid"] == [i / n for i in range(n + 1)]
    losses = _scalars(workdir, f"stage{k}_{n}steps/distill_loss")
    assert len(losses) == 3 and losses[-1] < losses[0], losses
  summary = open(os.path.join(workdir, "summary.md")).read()
  assert "| 2 | 1 |" in summary and "speedup" in summary
  assert "| FD (data) | FD (teacher) | memorised | precision | recall |" in summary
  assert "its floor, the teacher against itself: " in summary and "Floors: FD (data)" in summary
  assert os.path.getsize(os.path.join(workdir, "fd_vs_steps.png")) > 1000


def test_one_compilation_serves_all_stages(unbroken):
  _, _, built = unbroken
  assert len(built) == 1
  assert built[0].fn._cache_size() == 1


def test_resume_mid_stage_equals_unbroken_run(toy_teacher, unbroken, tmp_path):
  _, unbroken_params, _ = unbroken
  workdir = str(tmp_path / "resumed")
  config = _progressive_config(toy_teacher)
  with pytest.raises(KeyboardInterrupt):
    _run(config, workdir, crash_after_batches=60 + 45)     # dies in stage 1 at its step 45
  latest = ckpt_lib.manager(os.path.join(workdir, "stages", "1_2steps", "checkpoints"),
                            asynchronous=False).latest_step()
  assert latest in (20, 40)        # the last finalized save (step 40's may still be in flight)
  resumed_params, _ = _run(config, workdir)
  for a, b in zip(jax.tree.leaves(resumed_params), jax.tree.leaves(unbroken_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_direct_variant_distils_from_the_original_teacher(toy_teacher, tmp_path, monkeypatch):
  """6 -> 2 direct: the student's nested grid is [0, 2, 6] / 6 (6 -> 3 -> 2, the single step at the
  low-noise end); it is evaluated, recorded and exported on that grid, the DDIM teacher on uniform."""
  from jdistill.eval.evaluate import FDEvaluator
  config = _progressive_config(toy_teacher)
  config.progressive.update(two_step=False, steps="6,2", steps_per_stage=20)
  evaluations = []
  evaluate = FDEvaluator.evaluate

  def recording(self, params, num_steps, mode="ddim", final=False, grid=None, guidance=0.0):
    evaluations.append((num_steps, final, grid))
    return evaluate(self, params, num_steps, mode, final, grid)
  monkeypatch.setattr(FDEvaluator, "evaluate", recording)
  built = _run(config, str(tmp_path))[1]
  assert len(built) == 1
  grid = [0.0, 1 / 3, 1.0]
  with open(os.path.join(tmp_path, "stages", "0_2steps", "result.json")) as f:
    row = json.load(f)
  assert row["steps"] == 2 and row["grid"] == grid
  for path in ("stages/0_2steps/student.json", "student.json"):
    with open(os.path.join(tmp_path, path)) as f:
      assert json.load(f)["sampling"] == {"mode": "ddim", "steps": 2, "guidance": 0.0, "grid": grid}
  assert (6, True, None) in evaluations                    # the original teacher: uniform
  student = [e for e in evaluations if e[0] == 2 and e[2] is not None]
  assert student and all(e[2] == grid for e in student)
  assert [e for e in evaluations if e[0] == 2 and e[2] is None] == [(2, True, None)]  # DDIM row


def test_a_lora_run_exports_its_adapters_next_to_the_merged_student(toy_teacher, tmp_path):
  """A LoRA stage exports the merged student and, next to it, the adapters that make it from the
  stage's teacher (jdistill.export writes them as a PEFT adapter: tests/test_export.py)."""
  from flax import serialization
  from jdistill.models.lora import LoRA
  config = _progressive_config(toy_teacher)
  config.progressive.update(steps="2,1", steps_per_stage=20)
  config.lora.update(rank=2, alpha=4.0)
  workdir = str(tmp_path / "lora")
  methods.train(config, workdir)
  path = os.path.join(workdir, "student.msgpack")
  exported = teacher_lib.read_export(path)
  assert exported["lora"]["rank"] == 2 and "2-step teacher" in exported["lora"]["base"]
  read = lambda p: serialization.msgpack_restore(open(p, "rb").read())
  teacher = read(os.path.join(toy_teacher, "teacher.msgpack"))
  adapters = read(path.replace(".msgpack", ".lora.msgpack"))
  merged = LoRA(2, 4.0, tuple(config.lora.targets)).merge(teacher, adapters)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(read(path))):
    np.testing.assert_allclose(a, b, atol=1e-6)
