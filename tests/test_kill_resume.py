"""kill -9 at a seeded random point + resume == unbroken, bit for bit (checkpoints, best/, summary
FDs, exported models, TensorBoard as it shows the run), for progressive (two stages) and DMD2:
benchmarks/kill_resume.py's short form (its long form: docs/results.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import kill_resume  # noqa: E402

LOSS_TAGS = {"progressive": {"stage0_2steps/loss", "stage1_1steps/loss"}, "dmd2": {"loss"}}


@pytest.mark.parametrize("method", ["progressive", "dmd2"])
def test_killed_and_resumed_run_ends_bit_for_bit_like_the_unbroken_one(tmp_path, method):
  record = kill_resume.run_method(method, kills=1, seed=2, root=str(tmp_path), num_steps=20,
                                  repeat_unbroken=False, log=lambda text: None)
  assert record["problems"] == []
  assert record["kills"] == 1
  assert record["bitwise_equal_endings"] == record["runs"] >= 1
  assert record["corrupt_checkpoints"] == 0
  scalars = kill_resume.tensorboard_events(str(tmp_path / method / "unbroken"))
  for tag in LOSS_TAGS[method]:          # the TensorBoard comparison had the loss curves
    assert [step for step, _ in scalars[tag]][-1] == 20 or tag.startswith("stage0")
