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
from jdistill.methods import progressive
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


def test_direct_variant_distils_from_the_original_teacher(toy_teacher, tmp_path):
  config = _progressive_config(toy_teacher)
  config.progressive.update(two_step=False, steps="8,2", steps_per_stage=20)
  built = _run(config, str(tmp_path))[1]
  assert len(built) == 1
  with open(os.path.join(tmp_path, "stages", "0_2steps", "result.json")) as f:
    assert json.load(f)["steps"] == 2
