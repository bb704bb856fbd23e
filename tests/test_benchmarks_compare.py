"""benchmarks/compare.py on two hand-made result files: ratios, regression flags, missing rows."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_compare():
  spec = importlib.util.spec_from_file_location(
      "benchmarks_compare", os.path.join(ROOT, "benchmarks", "compare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


compare = load_compare()
METRICS = {"samples_per_s": "higher", "compile_seconds": "lower"}


def result_file(path, rows):
  path.write_text(json.dumps(dict(benchmark="train_step", machine={"backend": "cpu", "cpu": "test"},
                                  metrics=METRICS, rows=rows)))
  return str(path)


@pytest.fixture
def files(tmp_path):
  a = result_file(tmp_path / "a.json", [
      dict(key="progressive/0.5M", samples_per_s=100.0, compile_seconds=10.0),
      dict(key="teacher/0.5M", samples_per_s=200.0, compile_seconds=5.0),
      dict(key="dmd/0.5M", samples_per_s=50.0, compile_seconds=8.0)])
  b = result_file(tmp_path / "b.json", [
      dict(key="progressive/0.5M", samples_per_s=80.0, compile_seconds=10.5),    # 1.25x slower
      dict(key="teacher/0.5M", samples_per_s=230.0, compile_seconds=6.0),        # compile 1.2x
      dict(key="sampling/1", samples_per_s=1.0, compile_seconds=1.0)])
  return a, b


def test_ratios_and_regressions(files):
  a, b = files
  comparisons, only_a, only_b = compare.compare(compare.load(a), compare.load(b), threshold=0.10)
  found = {(c.key, c.metric): c for c in comparisons}
  assert len(found) == 4
  slow = found["progressive/0.5M", "samples_per_s"]
  assert slow.ratio == pytest.approx(0.8) and slow.slowdown == pytest.approx(1.25) and slow.regression
  assert not found["progressive/0.5M", "compile_seconds"].regression            # 5% is within 10%
  faster = found["teacher/0.5M", "samples_per_s"]
  assert faster.ratio == pytest.approx(1.15) and not faster.regression
  assert found["teacher/0.5M", "compile_seconds"].regression                    # a time that rose 20%
  assert only_a == ["dmd/0.5M"] and only_b == ["sampling/1"]


def test_main_prints_ratios_and_fails_only_when_asked(files, capsys):
  a, b = files
  assert compare.main([a, b]) == 0
  out = capsys.readouterr().out
  assert "| progressive/0.5M | samples_per_s | 100 | 80 | 0.800 | REGRESSION (1.25x slower) |" in out
  assert "only in A: dmd/0.5M" in out and "only in B: sampling/1" in out
  assert "2 regression(s)" in out
  assert compare.main([a, b, "--fail-on-regression"]) == 1
  assert compare.main([a, b, "--fail-on-regression", "--threshold=0.3"]) == 0


def test_rejects_a_file_without_rows(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"benchmark": "x"}))
  with pytest.raises(ValueError, match="not a benchmark result file"):
    compare.load(str(path))
