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

from jdistill.methods import teacher
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One leg of the run: `devices` simulated devices and mesh.fsdp=`fsdp`; a preemption (an
# exception) after `stop_after` batches of this invocation, or none.
LEG = textwrap.dedent("""
    import sys
    import jax
    from absl import logging
    from jdistill import methods
    from jdistill.data import pipeline
    from jdistill.methods import teacher
    sys.path.insert(0, {tests!r})
    from conftest import tiny_unet
    workdir, devices, fsdp, stop_after = {workdir!r}, {devices}, {fsdp}, {stop_after}
    assert jax.device_count() == devices
    logging.set_verbosity(logging.INFO)
    config = tiny_unet(teacher.get_config("digits"))
    config.data.batch_size = 16
    config.optim.warmup_steps = 2
    config.train.update(num_steps=8, log_every=2, save_every=2, eval_every=0)
    config.eval.update(num_samples=32, final_steps=(1,), batch_size=32)
    config.mesh.fsdp = fsdp
    to_global, calls = pipeline.to_global, [0]
    def preempted_after(batch, sharding):
      calls[0] += 1
      if stop_after is not None and calls[0] > stop_after:
        raise SystemExit(3)
      return to_global(batch, sharding)
    pipeline.to_global = preempted_after
    methods.train(config, workdir)
""")


def _leg(workdir, devices, fsdp, stop_after=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  script = LEG.format(tests=os.path.join(REPO, "tests"), workdir=str(workdir), devices=devices,
                      fsdp=fsdp, stop_after=stop_after)
  out = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == (0 if stop_after is None else 3), out.stderr[-3000:]
  return out.stderr


def _resumed_at(log):
  match = re.search(r"Resumed from \S+ at step (\d+)", log)
  assert match, log[-3000:]
  return int(match.group(1))


def _final_state(workdir):
  config = tiny_unet(teacher.get_config("digits"))
  exp = setup.build(config, str(workdir) + "_read", evaluator=False, record_config=False)
  compiled = loop.compile_step(teacher.make_objective(exp, 8), exp.mesh)
  manager = ckpt_lib.manager(os.path.join(workdir, "checkpoints"), asynchronous=False)
  state, meta = ckpt_lib.restore(manager, compiled.abstract_state)
  assert meta["step"] == 8
  return jax.device_get(state)


def test_a_run_resumed_on_8_then_4_then_1_devices_equals_the_unbroken_run(tmp_path):
  resumed, unbroken = tmp_path / "resumed", tmp_path / "unbroken"
  _leg(resumed, devices=8, fsdp=4, stop_after=5)       # saves step 2 (and 4 unless cut short)
  first = _resumed_at(_leg(resumed, devices=4, fsdp=2, stop_after=3))
  second = _resumed_at(_leg(resumed, devices=1, fsdp=1))
  assert first in (2, 4) and first < second < 8, (first, second)
  _leg(unbroken, devices=1, fsdp=1)
  a, b = _final_state(resumed), _final_state(unbroken)
  leaves = jax.tree.leaves_with_path(a)
  assert len(leaves) > 50                               # params, EMA and Adam's moments
  for (path, x), y in zip(leaves, jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
