"""A preempted job may come back on another slice: the full train state saved on 8 simulated
devices (FSDP 4 x data 2) resumes on 4 (FSDP 2 x data 2), then on 1, and the run ends as the
unbroken one-device run does, to float tolerance."""
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np

from conftest import tiny_unet

from jdistill import methods
from jdistill.methods import teacher
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def leg_config(fsdp=1):
  config = tiny_unet(teacher.get_config("digits"))
  config.data.batch_size = 16
  config.optim.update(warmup_steps=2, ema_decay=0.5)
  config.train.update(num_steps=8, log_every=2, save_every=2, eval_every=0)
  config.eval.update(num_samples=32, final_steps=(1,), batch_size=32)
  config.mesh.fsdp = fsdp
  return config


# One leg on `devices` simulated devices, preempted (an exception) after `stop_after` batches.
LEG = textwrap.dedent("""
    import sys
    import jax
    from absl import logging
    from jdistill import methods
    from jdistill.data import pipeline
    sys.path.insert(0, {tests!r})
    from test_reshard_resume import leg_config
    assert jax.device_count() == {devices}
    logging.set_verbosity(logging.INFO)
    to_global, calls = pipeline.to_global, [0]
    def preempted_after(batch, sharding):
      calls[0] += 1
      if calls[0] > {stop_after}:
        raise SystemExit(3)
      return to_global(batch, sharding)
    pipeline.to_global = preempted_after
    methods.train(leg_config({fsdp}), {workdir!r})
""")


def _preempted_leg(workdir, devices, fsdp, stop_after):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  script = LEG.format(tests=os.path.join(REPO, "tests"), workdir=str(workdir), devices=devices,
                      fsdp=fsdp, stop_after=stop_after)
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=1800)
  assert out.returncode == 3, out.stderr[-3000:]
  return out.stderr


def _resumed_at(log):
  match = re.search(r"Resumed from \S+ at step (\d+)", log)
  assert match, log[-3000:]
  return int(match.group(1))


def _final_state(workdir):
  exp = setup.build(leg_config(), str(workdir) + "_read", evaluator=False, record_config=False)
  compiled = loop.compile_step(teacher.make_objective(exp, 8), exp.mesh)
  manager = ckpt_lib.manager(os.path.join(workdir, "checkpoints"), asynchronous=False)
  state, meta = ckpt_lib.restore(manager, compiled.abstract_state)
  assert meta["step"] == 8
  return jax.device_get(state)


def test_a_run_resumed_on_8_then_4_then_1_devices_equals_the_unbroken_run(tmp_path, caplog):
  resumed, unbroken = tmp_path / "resumed", tmp_path / "unbroken"
  _preempted_leg(resumed, devices=8, fsdp=4, stop_after=5)         # saves steps 2 and 4
  on_four = _resumed_at(_preempted_leg(resumed, devices=4, fsdp=2, stop_after=3))
  with caplog.at_level("INFO"):
    methods.train(leg_config(), str(resumed))                       # this process: 1 device
  on_one = _resumed_at(caplog.text)
  assert on_four == 4 and on_one == 6, (on_four, on_one)
  methods.train(leg_config(), str(unbroken))
  a, b = _final_state(resumed), _final_state(unbroken)
  leaves = jax.tree.leaves_with_path(a)
  assert len(leaves) > 50                                           # params, EMA and Adam's moments
  for (path, x), y in zip(leaves, jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
