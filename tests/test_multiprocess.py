"""Two-process `jax.distributed` smoke test on CPU (127.0.0.1 only, gloo collectives).

Three 2-process teacher runs of a tiny U-Net, each started with launch/local_multiprocess.sh:

  resume/    6 steps (checkpoints at 3 and 6), then the same command with num_steps=9: resumes at 6
  unbroken/  9 steps in one go

and the numbers: the resumed 6+3 run must end with the same params, EMA params, exported teacher
and logged loss as the unbroken 9-step run, and both runs' step-6 checkpoints must agree. The
learning rate is constant (no warmup, no decay) so that the schedule does not depend on num_steps.

Why not compare against a 1-process run: with P processes each process reads
`shuffled[process_index::P]`, so the global batch holds the same examples in a different order
(checked below without processes), and each batch position gets its own t/noise draw: the
updates differ by design, so the 2-process run is compared with itself.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
RUN_TIMEOUT_S = 300

TINY = [
    "--config=configs/teacher.py",
    "--config.model.channels=8", "--config.model.channel_mult=(1,)",
    "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=()",
    "--config.model.norm_groups=4",
    "--config.data.batch_size=16",
    "--config.optim.schedule=constant", "--config.optim.warmup_steps=0",
    "--config.train.save_every=3", "--config.train.log_every=3", "--config.train.eval_every=0",
    "--config.eval.num_samples=64", "--config.eval.batch_size=64",
    "--config.eval.final_steps=(2,)", "--config.eval.steps_during_training=(2,)",
]


def _free_port():
  try:
    import portpicker
    return portpicker.pick_unused_port()
  except ImportError:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      return s.getsockname()[1]


def _launch(workdir: Path, num_steps: int, log_dir: Path, *flags):
  """Runs 2 processes via the launcher; returns (exit status, [process 0 log, process 1 log])."""
  env = dict(os.environ, NUM_PROCESSES="2", DEVICES_PER_PROCESS="1", PORT=str(_free_port()),
             LOG_DIR=str(log_dir), PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # the launcher sets the per-process device count
  command = ["bash", str(LAUNCHER), *TINY, f"--workdir={workdir}",
             f"--config.train.num_steps={num_steps}", *flags]
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    _, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the two processes it started
    proc.communicate()
    pytest.fail(f"2-process run in {workdir} did not finish in {RUN_TIMEOUT_S}s; logs in {log_dir}")
  logs = [(log_dir / f"process_{i}.log").read_text() for i in range(2)]
  if proc.returncode != 0:
    tails = "\n".join(f"--- process {i} ---\n" + "\n".join(log.splitlines()[-25:])
                      for i, log in enumerate(logs))
    pytest.fail(f"2-process run in {workdir} failed ({proc.returncode}):\n{stderr}\n{tails}")
  return proc.returncode, logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  out = {}
  out["first"] = _launch(base / "resume", 6, base / "logs_first")
  out["resumed"] = _launch(base / "resume", 9, base / "logs_resumed",
                           "--allow_config_changes=train.num_steps")
  out["unbroken"] = _launch(base / "unbroken", 9, base / "logs_unbroken")
  out["base"] = base
  return out


def _checkpoint_steps(workdir: Path):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _logged(log: str, name: str, step: int, total: int) -> float:
  match = re.search(rf"step {step}/{total} .*?\b{name}=([-+0-9.eE]+)", log)
  assert match, f"no 'step {step}/{total} ... {name}=' line in the log"
  return float(match.group(1))


def test_both_processes_ran_distributed(runs):
  for name in ("first", "resumed", "unbroken"):
    returncode, logs = runs[name]
    assert returncode == 0
    for i, log in enumerate(logs):
      assert "jdistill teacher on 2 cpu device(s), 2 process(es)" in log, (name, i)
      assert "Gloo" in log and "connected to 1 peer ranks" in log, (name, i)


def test_checkpoint_at_final_step(runs):
  base = runs["base"]
  assert _checkpoint_steps(base / "unbroken") == [6, 9]  # max_to_keep=2 of 3, 6, 9
  from jdistill.train import checkpoint as ckpt_lib
  assert ckpt_lib.read_meta(str(base / "unbroken" / "checkpoints"))["step"] == 9
  for i, log in enumerate(runs["first"][1]):
    assert re.search(r"step 6/6 ", log), i
  # The first 6-step run left a checkpoint at its last step (then the resumed run added 9).
  assert 6 in _checkpoint_steps(base / "resume")
  assert ckpt_lib.read_meta(str(base / "resume" / "checkpoints"), step=6)["step"] == 6
  # Process 0 exported the teacher; the summary is written once.
  for run in ("resume", "unbroken"):
    assert (base / run / "teacher.msgpack").stat().st_size > 0
    assert json.loads((base / run / "teacher.json").read_text())["train_steps"] == 9
    assert (base / run / "summary.md").exists()


def test_resume_continues_from_step_6_to_9(runs):
  base = runs["base"]
  for i, log in enumerate(runs["resumed"][1]):
    assert re.search(r"Resumed from .*/resume/checkpoints at step 6\.", log), i
    assert re.search(r"step 9/9 ", log), i
    assert not re.search(r"step [36]/9 ", log), i  # no step before 6 was retrained
  for i, log in enumerate(runs["unbroken"][1] + runs["first"][1]):
    assert "Resumed" not in log
  assert _checkpoint_steps(base / "resume") == [6, 9]
  from jdistill.train import checkpoint as ckpt_lib
  assert ckpt_lib.read_meta(str(base / "resume" / "checkpoints"))["step"] == 9


def _params_reader(tmp_path):
  """abstract params (1-process mesh here) to read the 2-process checkpoints with the library."""
  from jdistill.config import base_config
  from jdistill.train import setup
  config = base_config("digits")
  config.model.update(channels=8, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                      norm_groups=4)
  return setup.build(config, str(tmp_path / "reader"), evaluator=False).abstract_params()


def _max_abs_diff(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 10
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(leaves_a, leaves_b))


def test_resumed_run_matches_unbroken_run(runs, tmp_path):
  from flax import serialization
  from jdistill.train import checkpoint as ckpt_lib
  base = runs["base"]
  abstract = _params_reader(tmp_path)
  resumed, unbroken = str(base / "resume" / "checkpoints"), str(base / "unbroken" / "checkpoints")

  def params(directory, key, step):  # a 2-process checkpoint read by this single process
    return ckpt_lib.restore_params(directory, abstract, key=key, step=step)

  # Training moved the params: the tolerance below is far smaller than what 3 steps change.
  moved = _max_abs_diff(params(unbroken, "params", 9), params(unbroken, "params", 6))
  assert moved > 1e-3, moved

  for key in ("params", "ema_params"):
    for step in (6, 9):
      diff = _max_abs_diff(params(resumed, key, step), params(unbroken, key, step))
      assert diff <= 1e-5 * moved, (key, step, diff, moved)

  exported = [serialization.msgpack_restore((base / run / "teacher.msgpack").read_bytes())
              for run in ("resume", "unbroken")]
  assert _max_abs_diff(*exported) <= 1e-5 * moved
  # process 0 exported exactly the EMA params of the final checkpoint
  assert _max_abs_diff(exported[1], params(unbroken, "ema_params", 9)) == 0.0

  # The logged metrics agree: between the two processes of a run, and resumed vs unbroken.
  for name in ("loss", "grad_norm"):
    values = [_logged(log, name, 9, 9) for run in ("resumed", "unbroken") for log in runs[run][1]]
    assert np.isfinite(values).all()
    np.testing.assert_allclose(values, values[0], rtol=1e-3)
  first = [_logged(log, "loss", 6, 6) for log in runs["first"][1]]
  assert first[0] == first[1] and np.isfinite(first[0])


def test_process_shards_partition_the_global_batch(monkeypatch):
  """What each of 2 processes reads makes up exactly the 1-process global batch, reordered."""
  from jdistill.data import pipeline, sources
  source = sources.digits("train")

  def batches(index, count, n=4):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
    iterator = iter(pipeline.train_dataset(source, 16, seed=0))
    return [next(iterator)["x"] for _ in range(n)]

  single = batches(0, 1)
  shards = [batches(i, 2) for i in range(2)]
  reordered = False
  for k, whole in enumerate(single):
    assert shards[0][k].shape == shards[1][k].shape == (8, 8, 8, 1)
    together = np.concatenate([shards[0][k], shards[1][k]])
    flat = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))
    assert flat(together) == flat(whole), k      # the same 16 examples ...
    reordered |= not np.array_equal(together, whole)
  assert reordered                               # ... in another order
