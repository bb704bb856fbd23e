"""Compares two benchmark result files row by row: prints B/A for every metric the files declare,
and flags regressions (B more than --threshold slower than A).

  python benchmarks/compare.py benchmarks/results/train_step_cpu.json new/train_step_cpu.json
  python benchmarks/compare.py A.json B.json --threshold=0.05 --fail-on-regression   # for CI

A result file (written by the benchmarks) holds `rows` with a unique `key` and `metrics`, a map
from a row field to 'higher' or 'lower' (which is better). 'Slower' means: a throughput that fell
by more than the threshold (B/A < 1 / (1 + threshold)), or a time or count that rose by more
(B/A > 1 + threshold). Pure Python: no JAX or torch needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import NamedTuple


class Comparison(NamedTuple):
  key: str
  metric: str
  a: float
  b: float
  ratio: float          # b / a
  slowdown: float       # > 1: b is worse than a by this factor
  regression: bool


def load(path: str) -> dict:
  with open(path) as f:
    result = json.load(f)
  if "rows" not in result or "metrics" not in result:
    raise ValueError(f"{path}: not a benchmark result file (needs 'rows' and 'metrics')")
  return result


def compare(a: dict, b: dict, threshold: float = 0.10):
  """(comparisons, keys only in a, keys only in b) for the metrics declared by `a`."""
  rows_a = {row["key"]: row for row in a["rows"]}
  rows_b = {row["key"]: row for row in b["rows"]}
  directions = dict(b.get("metrics", {}), **a["metrics"])
  comparisons = []
  for key, row_a in rows_a.items():
    row_b = rows_b.get(key)
    if row_b is None:
      continue
    for metric, better in directions.items():
      value_a, value_b = row_a.get(metric), row_b.get(metric)
      if not isinstance(value_a, (int, float)) or not isinstance(value_b, (int, float)):
        continue
      if better not in ("higher", "lower"):
        raise ValueError(f"metric {metric!r}: direction must be 'higher' or 'lower', got {better!r}")
      ratio = value_b / value_a if value_a else (1.0 if value_b == value_a else float("inf"))
      if better == "higher":
        slowdown = 1.0 / ratio if ratio else float("inf")
      else:
        slowdown = ratio
      comparisons.append(Comparison(key, metric, float(value_a), float(value_b), ratio, slowdown,
                                    slowdown > 1.0 + threshold))
  only_a = [k for k in rows_a if k not in rows_b]
  only_b = [k for k in rows_b if k not in rows_a]
  return comparisons, only_a, only_b


def describe(result: dict, path: str) -> str:
  machine = result.get("machine", {})
  parts = [result.get("benchmark", "?"), machine.get("cpu") if machine.get("backend") == "cpu"
           else machine.get("device"), machine.get("date"), machine.get("commit")]
  return f"{path}: " + ", ".join(str(p) for p in parts if p)


def format_number(value: float) -> str:
  return f"{value:.4g}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("a", help="the baseline result file")
  parser.add_argument("b", help="the new result file")
  parser.add_argument("--threshold", type=float, default=0.10,
                      help="flag rows more than this fraction slower (default 0.10)")
  parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 on a regression")
  args = parser.parse_args(argv)
  a, b = load(args.a), load(args.b)
  print("A = " + describe(a, args.a))
  print("B = " + describe(b, args.b))
  if a.get("benchmark") != b.get("benchmark"):
    print(f"warning: comparing a {a.get('benchmark')!r} file with a {b.get('benchmark')!r} file")
  comparisons, only_a, only_b = compare(a, b, args.threshold)
  print()
  print("| row | metric | A | B | B/A | |")
  print("|---|---|---|---|---|---|")
  for c in comparisons:
    flag = f"REGRESSION ({c.slowdown:.2f}x slower)" if c.regression else ""
    print(f"| {c.key} | {c.metric} | {format_number(c.a)} | {format_number(c.b)} | "
          f"{c.ratio:.3f} | {flag} |")
  for name, keys in (("A", only_a), ("B", only_b)):
    if keys:
      print(f"\nonly in {name}: {', '.join(keys)}")
  regressions = [c for c in comparisons if c.regression]
  print(f"\n{len(comparisons)} comparisons, {len(regressions)} regression(s) beyond "
        f"{100 * args.threshold:.0f}%")
  return 1 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
  sys.exit(main())
