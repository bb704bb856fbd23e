"""Adaptive vs uniform timestep curriculum on one digits progressive stage, several seeds, same
budget (configs/curriculum.py). Prints a table and writes the validation-loss curves as a PNG.

  python benchmarks/curriculum_ablation.py [--seeds=0,1,2] [--workdir=runs/curriculum_ablation]
      [--png=docs/curriculum_ablation.png]

'Steps to match' is the first evaluation step at which the adaptive run's validation
distillation loss (uniform student times, held-out digits) is <= the uniform run's final one.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scalars(workdir, tag):
  import tensorflow as tf
  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          values[event.step] = float(tf.make_ndarray(value.tensor))
  steps = sorted(values)
  return np.array(steps), np.array([values[s] for s in steps])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--workdir", default="runs/curriculum_ablation")
  parser.add_argument("--png", default="docs/curriculum_ablation.png")
  args = parser.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from configs.curriculum import get_config
  from jdistill import methods

  seeds = [int(s) for s in args.seeds.split(",")]
  curves, results = {}, []
  for seed in seeds:
    row = {"seed": seed}
    for variant in ("adaptive", "uniform"):
      config = get_config(variant)
      config.seed = seed
      workdir = os.path.join(args.workdir, f"{variant}_seed{seed}")
      start = time.time()
      methods.train(config, workdir)
      steps, val = scalars(workdir, "stage0_4steps/val_loss")
      _, fd = scalars(workdir, "stage0_4steps/fd")
      curves[(variant, seed)] = (steps, val)
      row[variant] = dict(final_val=val[-1], final_fd=fd[-1], minutes=(time.time() - start) / 60)
      print(f"seed {seed} {variant}: final val loss {val[-1]:.5f}, FD {fd[-1]:.3f}", flush=True)
    steps, adaptive_val = curves[("adaptive", seed)]
    reached = steps[adaptive_val <= row["uniform"]["final_val"]]
    row["steps_to_match"] = int(reached[0]) if len(reached) else None
    row["budget"] = int(steps[-1])
    results.append(row)

  print("\n| seed | adaptive: steps to reach uniform's final val loss | val loss adaptive | "
        "val loss uniform | FD adaptive | FD uniform |\n|---|---|---|---|---|---|")
  for r in results:
    match = f"{r['steps_to_match']} / {r['budget']}" if r["steps_to_match"] else f"not within {r['budget']}"
    print(f"| {r['seed']} | {match} | {r['adaptive']['final_val']:.5f} | {r['uniform']['final_val']:.5f} "
          f"| {r['adaptive']['final_fd']:.3f} | {r['uniform']['final_fd']:.3f} |")
  for key in ("final_val", "final_fd"):
    a = np.array([r["adaptive"][key] for r in results])
    u = np.array([r["uniform"][key] for r in results])
    print(f"mean {key}: adaptive {a.mean():.5f} +- {a.std():.5f}, uniform {u.mean():.5f} +- {u.std():.5f}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for (variant, seed), (steps, val) in sorted(curves.items()):
    ax.plot(steps, val, color="C0" if variant == "adaptive" else "C1", alpha=0.8,
            label=variant if seed == seeds[0] else None)
  ax.set_yscale("log")
  ax.set_xlabel("train step (stage 8 -> 4 steps)")
  ax.set_ylabel("validation distillation loss")
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
  fig.savefig(args.png, dpi=120)
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
