"""The sampling CLI and teacher export/import."""
import os
import subprocess
import sys

import numpy as np
import pytest

from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import setup, teachers as teacher_lib
from jdistill import methods

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def tiny_teacher_run(tmp_path_factory):
  from conftest import tiny_unet
  from jdistill.config import base_config
  config = tiny_unet(base_config("digits"))
  config.data.batch_size = 16
  config.train.update(num_steps=6, log_every=3, save_every=3, eval_every=0)
  config.eval.update(num_samples=32, final_steps=(1,), batch_size=32)
  workdir = str(tmp_path_factory.mktemp("teacher"))
  params = methods.train(config, workdir)
  return config, workdir, params


@pytest.mark.parametrize("checkpoint", [None, "teacher.msgpack"])
def test_sample_cli_writes_uint8_nhwc_and_a_png(tiny_teacher_run, tmp_path, checkpoint):
  _, workdir, _ = tiny_teacher_run
  out = tmp_path / "s.npz"
  cmd = [sys.executable, "-m", "jdistill.sample", f"--workdir={workdir}", "--num_steps=3",
         "--num_samples=12", f"--out={out}", "--fd", "--fd_repeats=2"]
  if checkpoint:
    cmd.append(f"--checkpoint={os.path.join(workdir, checkpoint)}")
  result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  samples = np.load(out)["samples"]
  assert samples.shape == (12, 8, 8, 1) and samples.dtype == np.uint8
  assert samples.max() > samples.min()
  assert (tmp_path / "s.png").stat().st_size > 100
  # --fd: the FD of exactly these samples (the run's params, seed 0) against the held-out split
  config, _, params = tiny_teacher_run
  exp = setup.build(config, str(tmp_path / "check"), record_config=False)
  fd = lambda line: float(line.split(" fd ")[-1].split()[0])
  lines = {line.split("seed ")[1].split(":")[0]: line for line in result.stdout.splitlines()
           if "samples, seed" in line}
  for seed in (0, 1):
    expected = exp.evaluator.fd_of(exp.sampler.sample(params, 3, 12, seed))["fd"]
    assert fd(lines[str(seed)]) == pytest.approx(expected, rel=1e-3)
  mean = float(result.stdout.split("fd mean ")[1].split()[0])
  assert mean == pytest.approx((fd(lines["0"]) + fd(lines["1"])) / 2, rel=1e-3)


def test_an_exported_model_samples_alone_without_its_run(tiny_teacher_run, tmp_path):
  """--checkpoint=MODEL.msgpack with no --workdir: the JSON next to it rebuilds the model and says
  how it samples; the samples equal those drawn through the run directory."""
  import json
  _, workdir, _ = tiny_teacher_run
  exported = json.load(open(os.path.join(workdir, "teacher.json")))
  assert exported["sampling"] == {"mode": "ddim", "steps": 256, "guidance": 0.0}
  assert exported["method"] == "teacher"
  alone = str(tmp_path / "model")
  os.makedirs(alone)
  for name in ("teacher.msgpack", "teacher.json"):        # the model moved away from its run
    with open(os.path.join(workdir, name), "rb") as src, open(os.path.join(alone, name), "wb") as dst:
      dst.write(src.read())
  outputs = []
  for flags in ([f"--checkpoint={alone}/teacher.msgpack"], [f"--workdir={workdir}"]):
    out = str(tmp_path / f"{len(outputs)}.npz")
    result = subprocess.run([sys.executable, "-m", "jdistill.sample", *flags, "--num_steps=3",
                             "--num_samples=12", f"--out={out}"], env=ENV, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    outputs.append(np.load(out)["samples"])
  np.testing.assert_array_equal(outputs[0], outputs[1])
  missing = subprocess.run([sys.executable, "-m", "jdistill.sample", f"--checkpoint={tmp_path}/none.msgpack"],
                           env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "none.json next to it" in missing.stderr


def test_an_exported_grid_is_sampled_on(tiny_teacher_run, tmp_path):
  """A progressive student's JSON records its nested grid; jdistill.sample draws on it (not on the
  uniform grid) unless --num_steps asks for another count."""
  import json
  from jdistill.eval.evaluate import to_uint8
  config, workdir, params = tiny_teacher_run
  exported = json.load(open(os.path.join(workdir, "teacher.json")))
  grid = [0.0, 0.12, 0.44, 1.0]
  exported["sampling"] = {"mode": "ddim", "steps": 3, "grid": grid}
  with open(os.path.join(tmp_path, "student.json"), "w") as f:
    json.dump(exported, f)
  with open(os.path.join(workdir, "teacher.msgpack"), "rb") as src, \
       open(os.path.join(tmp_path, "student.msgpack"), "wb") as dst:
    dst.write(src.read())
  out = str(tmp_path / "s.npz")
  result = subprocess.run([sys.executable, "-m", "jdistill.sample",
                           f"--checkpoint={tmp_path}/student.msgpack", "--num_samples=12",
                           f"--out={out}"], env=ENV, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  exp = setup.build(config, str(tmp_path / "check"), evaluator=False, record_config=False)
  on_grid = to_uint8(exp.sampler.sample(params, 3, 12, 0, grid=grid))
  np.testing.assert_array_equal(np.load(out)["samples"], on_grid)
  assert not np.array_equal(on_grid, to_uint8(exp.sampler.sample(params, 3, 12, 0)))


@pytest.mark.parametrize("flags,message", [
    (["--num_steps=0"], "flag --num_steps=0: 0 is not a positive integer"),
    (["--num_steps=-4"], "flag --num_steps=-4: -4 is not a positive integer"),
    (["--num_samples=0"], "flag --num_samples=0: 0 is not a positive integer"),
    (["--fd", "--fd_repeats=0"], "flag --fd_repeats=0: 0 is not a positive integer"),
    (["--seed=-1"], "flag --seed=-1: -1 is not a non-negative integer"),
    (["--fd", "--num_samples=1"], "--fd needs --num_samples >= 2"),
    (["--out={tmp}/missing/s.npz"], "--out must be a .npz file in an existing directory"),
    (["--out={tmp}/s.png"], "--out must be a .npz file in an existing directory"),
])
def test_sample_cli_refuses_nonsensical_flags_before_any_compute(tmp_path, flags, message):
  """Refused at flag parsing, before anything loads or samples: a non-zero exit, no output."""
  result = subprocess.run(
      [sys.executable, "-m", "jdistill.sample", f"--checkpoint={teacher_lib.BUNDLED_DIGITS_TEACHER}",
       f"--out={tmp_path}/s.npz", *(f.format(tmp=tmp_path) for f in flags)],
      env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert message in result.stderr
  assert list(tmp_path.iterdir()) == []


def test_exported_teacher_equals_checkpoint_ema(tiny_teacher_run):
  config, workdir, params = tiny_teacher_run
  exp = setup.build(config, workdir + "_check", evaluator=False)
  exported = teacher_lib.load_exported(os.path.join(workdir, "teacher.msgpack"), exp.abstract_params())
  restored = ckpt_lib.restore_params(os.path.join(workdir, "checkpoints"), exp.abstract_params())
  import jax
  for a, b, c in zip(jax.tree.leaves(exported), jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_bundled_teacher_refuses_a_different_model_config():
  from jdistill.config import base_config
  if not os.path.exists(teacher_lib.BUNDLED_DIGITS_TEACHER):
    pytest.fail("the bundled digits teacher is missing from jdistill/assets")
  config = base_config("digits")
  assert teacher_lib.bundled_teacher_path(config) == teacher_lib.BUNDLED_DIGITS_TEACHER
  config.model.channels = 17
  with pytest.raises(ValueError, match="config.model.channels=17"):
    teacher_lib.bundled_teacher_path(config)


def test_bundled_checkerboard_teacher_serves_toy2d_and_only_checkerboard():
  from jdistill.config import base_config
  config = base_config("toy2d")
  assert teacher_lib.bundled_teacher_path(config).endswith("checkerboard_teacher.msgpack")
  config.data.name = "moons"
  assert teacher_lib.bundled_teacher_path(config) is None


def test_final_tables_evaluate_on_final_num_samples(tiny_teacher_run, tmp_path):
  config, _, params = tiny_teacher_run
  config = config.copy_and_resolve_references()
  config.eval.update(num_samples=32, final_num_samples=96)
  exp = setup.build(config, str(tmp_path), record_config=False)
  during, samples = exp.evaluator.evaluate(params, 2)
  final, final_samples = exp.evaluator.evaluate(params, 2, final=True)
  assert len(samples) == 32 and len(final_samples) == 96
  # each FD is the one of its own samples against the held-out reference
  assert during["fd"] == pytest.approx(exp.evaluator.fd_of(samples)["fd"], rel=1e-9)
  assert final["fd"] == pytest.approx(exp.evaluator.fd_of(final_samples)["fd"], rel=1e-9)
  assert final["fd"] != pytest.approx(during["fd"], rel=1e-3)
  config.eval.final_num_samples = 0                     # 0: the training-time count
  assert len(setup.build(config, str(tmp_path), record_config=False).evaluator.evaluate(
      params, 2, final=True)[1]) == 32


def test_end_of_run_speed_is_timed_on_the_evaluation_batches(tiny_teacher_run, tmp_path):
  config, _, params = tiny_teacher_run
  config = config.copy_and_resolve_references()
  config.eval.update(num_samples=32, final_num_samples=96)       # batches of 32: three at the end
  exp = setup.build(config, str(tmp_path), record_config=False)
  samples, ms = exp.sampler.sample(params, 2, 96, seed=5, timed=True)
  np.testing.assert_array_equal(samples, exp.sampler.sample(params, 2, 96, seed=5))
  assert ms > 0
  assert exp.sampler.sample(params, 2, 32, timed=True)[1] is None   # one batch: none after the first
  assert "ms_per_sample" not in exp.evaluator.evaluate(params, 2)[0]   # during training: no speed
  final = exp.evaluator.evaluate(params, 2, final=True)[0]
  assert exp.evaluator.speed(final, params, 2) == final["ms_per_sample"] > 0
  assert exp.evaluator.speed({"fd": final["fd"]}, params, 2) > 0       # else time_sampling's
