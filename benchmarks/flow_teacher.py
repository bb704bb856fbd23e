"""The bundled rectified-flow digits teacher next to the VP one: FD (and the other metrics) at
64 / 16 / 4 / 2 / 1 Euler (= DDIM) steps, the flow teacher sampled at time shift 1, 2 and 3 (it
was trained at shift 1; sampling at shift s only moves its grid's points, tau = s t / (1 + (s-1) t)).

  python benchmarks/flow_teacher.py                 # about 10 minutes on 2 CPU cores
  python benchmarks/flow_teacher.py --samples=5000 --steps=64,4,1

Writes benchmarks/results/flow_teacher.json and prints a markdown table for docs/results.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def evaluate(preset, checkpoint, shift, steps, samples, workdir):
  """{steps: evaluation metrics} of the exported model at `checkpoint`, sampled on `preset`'s
  schedule at time `shift` (the model card's shift is the training one, so it is not checked)."""
  from jdistill.methods import teacher
  from jdistill.train import setup, teachers
  config = teacher.get_config(preset)
  if shift is not None:
    config.diffusion.schedule.shift = shift
  config.eval.num_samples = samples
  exp = setup.build(config, workdir, record_config=False)
  params = teachers.load_exported(checkpoint, exp.abstract_params())
  return {n: exp.evaluator.evaluate(params, n, final=True)[0] for n in steps}


def main():
  from jdistill.train import teachers
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--vp", default=teachers.BUNDLED_DIGITS_TEACHER, help="'' to skip it")
  parser.add_argument("--flow", default=teachers.BUNDLED_DIGITS_FLOW_TEACHER)
  parser.add_argument("--shifts", default="1,2,3")
  parser.add_argument("--steps", default="64,16,4,2,1")
  parser.add_argument("--samples", type=int, default=1000)
  parser.add_argument("--name", default="flow_teacher")
  args = parser.parse_args()
  steps = common.parse_list(args.steps, int)
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    runs = [("VP (cosine)", "digits", args.vp, None)] * bool(args.vp) + [
        (f"flow, shift {s:g}", "digits_flow", args.flow, s)
        for s in common.parse_list(args.shifts, float)]
    for name, preset, checkpoint, shift in runs:
      results = evaluate(preset, checkpoint, shift, steps, args.samples, workdir)
      rows.append(dict(key=name, shift=shift, **{f"fd_{n}": r["fd"] for n, r in results.items()},
                       metrics={n: {k: float(v) for k, v in r.items()} for n, r in results.items()}))
      print(name, {n: round(r["fd"], 2) for n, r in results.items()}, flush=True)
  print()
  common.print_table(["teacher", *(f"{n} steps" for n in steps)],
                     [[row["key"], *(f"{row[f'fd_{n}']:.4g}" for n in steps)] for row in rows])
  common.write_results(args.name, "flow_teacher", dict(samples=args.samples, steps=steps),
                       {f"fd_{n}": "lower" for n in steps}, rows, common.machine_info())


if __name__ == "__main__":
  main()
