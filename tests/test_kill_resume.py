"""kill -9 at random points + resume == unbroken, bit for bit, for progressive (across a stage
boundary) and DMD2: benchmarks/kill_resume.py's short form (the long form: docs/results.md)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import kill_resume  # noqa: E402


@pytest.mark.parametrize("method", ["progressive", "dmd2"])
def test_killed_and_resumed_run_ends_bit_for_bit_like_the_unbroken_one(tmp_path, method):
  record = kill_resume.run_method(method, kills=1, seed=3, root=str(tmp_path), num_steps=20,
                                  repeat_unbroken=False, log=lambda text: None)
  assert record["problems"] == []
  assert record["kills"] == 1
  assert record["bitwise_equal_endings"] == record["runs"] >= 1
  assert record["corrupt_checkpoints"] == 0
