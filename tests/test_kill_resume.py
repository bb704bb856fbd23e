"""kill -9 at a seeded random point + resume == unbroken, bit for bit (checkpoints, best/, summary
FDs, exported models, TensorBoard as it shows the run), for progressive across its stage
boundary: benchmarks/kill_resume.py's short form (its long form, every method: docs/results.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import kill_resume  # noqa: E402


@pytest.mark.parametrize("method", ["progressive"])
def test_killed_and_resumed_run_ends_bit_for_bit_like_the_unbroken_one(tmp_path, method):
  record = kill_resume.run_method(method, kills=1, seed=2, root=str(tmp_path), num_steps=20,
                                  repeat_unbroken=False, log=lambda text: None)
  assert record["problems"] == []
  assert record["kills"] == 1
  assert record["bitwise_equal_endings"] == record["runs"] >= 1
  assert record["corrupt_checkpoints"] == 0
  # the TensorBoard comparison covered the whole run (both stages)
  steps = {tag: [step for step, _ in events] for tag, events in
           kill_resume.tensorboard_events(str(tmp_path / method / "unbroken")).items()}
  assert max(max(s) for s in steps.values()) == 20
  if method == "progressive":
    assert {tag.split("/")[0] for tag in steps} >= {"stage0_2steps", "stage1_1steps"}
