"""The generic loop: sharded == one device, kill -9 + resume == unbroken, NaN stops cleanly."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from clu import metric_writers
from flax import serialization

from jdistill.data import pipeline, sources
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup
from jdistill.methods.teacher import make_objective as objective_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)

SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    assert jax.device_count() == 8
    from jdistill.config import base_config
    from jdistill.data import pipeline
    from jdistill.train import loop, setup
    from jdistill import partitioning
    from jdistill.methods.teacher import make_objective as objective_for
    # the U-Net on the VP path, and the DiT on the rectified-flow path
    for model, preset, size in [
        ("unet", "digits", dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)),
        ("dit", "digits_flow", dict(name="dit", channels=32, num_heads=2, depth=2))]:
      config = base_config(preset)
      config.model.update(size)
      config.data.batch_size = 32
      exp = setup.build(config, "{workdir}/" + model, evaluator=False)
      objective = objective_for(exp, 100)
      iterator = pipeline.make_iterator(exp.train_data())
      batches = [next(iterator) for _ in range(3)]
      results = {{}}
      for name, mesh in [("one", partitioning.make_mesh(1, jax.devices()[:1])),
                         ("data8", partitioning.make_mesh(1)), ("fsdp2x4", partitioning.make_mesh(4))]:
        compiled = loop.compile_step(objective, mesh)
        state = loop.init_state(objective, compiled, jax.random.key(0))
        for i, b in enumerate(batches):
          state, metrics = compiled.fn(state, pipeline.to_global(b, partitioning.batch_sharding(mesh)),
                                       jax.random.key(i), None, None)
        specs = [str(x.sharding.spec) for x in jax.tree.leaves(state.params)]
        first = state.params["Conv_0" if model == "unet" else "pos_embed"]["kernel"]
        results[name] = (jax.device_get(state.params), float(metrics["loss"]),
                         sum("fsdp" in s for s in specs), len(first.sharding.device_set))
      one = results["one"]
      for name in ("data8", "fsdp2x4"):
        params, loss, fsdp_sharded, devices = results[name]
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one[0])))
        print(f"{{model}}_{{name}} maxdiff={{diff:.3g}} loss={{loss:.7f}} one_loss={{one[1]:.7f}} fsdp_params={{fsdp_sharded}} devices={{devices}}")
""")


def test_sharded_step_equals_one_device_step(tmp_path):
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(workdir=tmp_path)], env=env,
                       capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = {l.split()[0]: dict(kv.split("=") for kv in l.split()[1:])
           for l in out.stdout.splitlines() if "maxdiff" in l}
  for model in ("unet", "dit"):
    for name in (f"{model}_data8", f"{model}_fsdp2x4"):
      assert float(lines[name]["maxdiff"]) < 2e-5, lines
      np.testing.assert_allclose(float(lines[name]["loss"]), float(lines[name]["one_loss"]), rtol=1e-5)
      assert int(lines[name]["devices"]) == 8
    assert int(lines[f"{model}_data8"]["fsdp_params"]) == 0
    assert int(lines[f"{model}_fsdp2x4"]["fsdp_params"]) > 10      # FSDP really shards the params


def _teacher_cmd(workdir, num_steps):
  return [sys.executable, "-m", "jdistill.main", "--config=configs/teacher.py", f"--workdir={workdir}",
          "--config.model.channels=8", "--config.model.num_res_blocks=1", "--config.model.norm_groups=4",
          "--config.data.batch_size=16", f"--config.train.num_steps={num_steps}",
          "--config.train.save_every=10", "--config.train.log_every=10", "--config.train.eval_every=0",
          "--config.eval.num_samples=32", "--config.eval.final_steps=(1,)"]


def _exported(workdir):
  with open(os.path.join(workdir, "teacher.msgpack"), "rb") as f:
    return serialization.msgpack_restore(f.read())


def test_kill_and_resume_matches_unbroken_run(tmp_path):
  unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
  subprocess.run(_teacher_cmd(unbroken, 250), env=ENV, cwd=REPO, check=True, capture_output=True,
                 timeout=600)
  process = subprocess.Popen(_teacher_cmd(killed, 250), env=ENV, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "100").is_dir() and time.time() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  steps_at_kill = ckpt_lib.manager(str(killed / "checkpoints"), asynchronous=False).all_steps()
  assert 100 <= max(steps_at_kill) < 250, steps_at_kill   # it really died mid-run
  resumed = subprocess.run(_teacher_cmd(killed, 250), env=ENV, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {killed}/checkpoints at step {max(steps_at_kill)}" in resumed.stderr
  a, b = _exported(unbroken), _exported(killed)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def _nan_source(source):
  x = source.records.x.copy()
  x[:] = np.nan
  return sources.Source(sources.ArraySource(x, source.records.label), source.data_shape,
                        source.num_classes)


def test_nan_loss_stops_and_never_reaches_a_checkpoint(tmp_path, digits_config):
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  objective = objective_for(exp, 100)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  common = dict(workdir=str(tmp_path), mesh=exp.mesh, writer=writer)
  settings = lambda n: loop.Settings(num_steps=n, log_every=4, save_every=4)
  compiled = loop.compile_step(objective, exp.mesh)
  state, _ = loop.run(objective, settings(8), train_data=exp.train_data(), compiled=compiled, **common)
  good = jax.device_get(state.params)
  exp.train_source = _nan_source(exp.train_source)
  with pytest.raises(loop.NonFiniteLossError, match="NaN/Inf in 4 of the last 4 steps"):
    loop.run(objective, settings(16), train_data=exp.train_data(), compiled=compiled, **common)
  manager = ckpt_lib.manager(str(tmp_path / "checkpoints"), asynchronous=False)
  assert manager.latest_step() == 8          # nothing saved after the NaN
  restored, meta = ckpt_lib.restore(manager, compiled.abstract_state)
  for x, y in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(good)):
    np.testing.assert_array_equal(x, y)
    assert np.all(np.isfinite(x))


def test_nonfinite_update_is_skipped_inside_the_step(digits_config, tmp_path):
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  objective = objective_for(exp, 100)
  compiled = loop.compile_step(objective, exp.mesh)
  state = loop.init_state(objective, compiled, jax.random.key(0))
  before = jax.device_get(state.params)
  batch = {"x": np.full((16, 8, 8, 1), np.nan, np.float32), "label": np.zeros(16, np.int32)}
  state, metrics = compiled.fn(state, batch, jax.random.key(1), None, None)
  assert int(metrics["nonfinite"]) == 1
  assert int(state.step) == 1
  for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)


def test_missing_and_mismatched_checkpoints_say_which_and_why(tmp_path, digits_config):
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="does not exist"):
    ckpt_lib.restore_params(str(tmp_path / "nowhere"), exp.abstract_params())
  objective = objective_for(exp, 100)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  loop.run(objective, loop.Settings(num_steps=4, log_every=4, save_every=4),
           workdir=str(tmp_path / "a"), mesh=exp.mesh, train_data=exp.train_data(), writer=writer)
  digits_config.model.channels = 16
  other = setup.build(digits_config, str(tmp_path / "b"), evaluator=False)
  with pytest.raises(ckpt_lib.CheckpointError, match="has shape .* the configured model expects"):
    ckpt_lib.restore_params(str(tmp_path / "a" / "checkpoints"), other.abstract_params())


def test_a_nonfinite_update_with_a_finite_loss_never_reaches_the_params(tmp_path, digits_config):
  """Adam with eps = 0 divides 0 by 0 on the exactly-zero gradients of step 1: the loss is finite,
  the new params are not. The step is skipped, the loop names the update, and the checkpoint holds
  the last finite state."""
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  digits_config.optim.eps = 0.0          # past validation, which refuses it (test below)
  objective = objective_for(exp, 100)
  compiled = loop.compile_step(objective, exp.mesh)
  state = loop.init_state(objective, compiled, jax.random.key(0))
  before = jax.device_get(state.params)
  batch = next(pipeline.make_iterator(exp.train_data()))
  state, metrics = compiled.fn(state, batch, jax.random.key(1), None, None)
  assert np.isfinite(float(metrics["loss"]))
  assert int(metrics["nonfinite"]) == 1 and int(metrics["nonfinite_update"]) == 1
  for x, y in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(x, y)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  with pytest.raises(loop.NonFiniteLossError, match="the update .* was NaN/Inf with a finite loss in 4"):
    loop.run(objective, loop.Settings(num_steps=8, log_every=4, save_every=4),
             workdir=str(tmp_path / "run"), mesh=exp.mesh, train_data=exp.train_data(), writer=writer)
  assert ckpt_lib.manager(str(tmp_path / "run" / "checkpoints"), asynchronous=False).latest_step() is None


@pytest.mark.parametrize("field, value", [("eps", 0.0), ("b1", 1.0), ("b2", 1.0), ("grad_clip", -1.0)])
def test_optimizer_fields_that_make_nan_updates_are_refused(digits_config, field, value):
  from jdistill.config import validate
  from jdistill.errors import ConfigError
  digits_config.optim[field] = value
  with pytest.raises(ConfigError, match=f"config.optim.{field}"):
    validate(digits_config, 1)
