"""The whole benchmark suite, one script after the other (each in its own process), then
docs/benchmarks.md.

  python benchmarks/suite.py                 # the full suite (train_step prints its estimate)
  python benchmarks/suite.py --quick         # every script at its smoke-test settings
  python benchmarks/suite.py --dtype=bf16    # on a GPU/TPU: bf16 train steps
  python benchmarks/suite.py -- --sizes=0.5M,5M     # extra flags go to train_step.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dtype", default="f32", choices=("f32", "bf16"))
  parser.add_argument("train_step_flags", nargs="*", help="after --: flags for train_step.py")
  args = parser.parse_args(argv)
  quick = ["--quick"] if args.quick else []
  runs = [["compile_count.py", *quick], ["sampling.py", *quick],
          ["train_step.py", *quick, f"--dtype={args.dtype}", *args.train_step_flags]]
  start = time.time()
  for script, *flags in runs:
    command = [sys.executable, os.path.join(HERE, script), *flags, "--no-docs"]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
  subprocess.run([sys.executable, os.path.join(HERE, "report.py")], check=True)
  print(f"suite done in {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
  main()
