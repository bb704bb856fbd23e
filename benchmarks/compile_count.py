"""Compile count and compile time over whole runs of the real drivers: the full progressive schedule
64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1 on the bundled digits teacher (a few train steps per stage),
and short teacher and DMD2 runs. Every XLA compilation is counted by function through
jax.monitoring; the train step must compile once per objective, whatever the number of stages.

  python benchmarks/compile_count.py            # about 5 minutes on 2 CPU cores
  python benchmarks/compile_count.py --quick    # fewer steps and evaluation samples

Writes benchmarks/results/<name>.json and re-renders docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
          "/jax/core/compile/backend_compile_duration": "xla"}


class CompileLog:
  """Per function: XLA compilations, and seconds spent tracing, lowering and compiling."""

  def __init__(self):
    self.reset()
    import jax
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def reset(self):
    self.count = collections.Counter()
    self.seconds = collections.defaultdict(lambda: collections.Counter())

  def _record(self, event, duration, fun_name="?", **_):
    if event not in EVENTS:
      return
    name = str(fun_name)
    for prefix in ("jit_", "jit(", "pjit_"):
      name = name[len(prefix):] if name.startswith(prefix) else name
    name = name.rstrip(")")
    self.seconds[name][EVENTS[event]] += duration
    if EVENTS[event] == "xla":
      self.count[name] += 1

  def summary(self):
    return {name: dict(compilations=self.count[name], **{k: round(v, 3) for k, v in secs.items()},
                       total_seconds=round(sum(secs.values()), 3))
            for name, secs in sorted(self.seconds.items())}


def configs(args):
  from jdistill.methods import distribution_matching, progressive as pd_method, teacher as teacher_method
  evaluation = dict(num_samples=args.eval_samples, batch_size=args.eval_samples)
  teacher = teacher_method.get_config("digits")
  teacher.train.update(num_steps=args.train_steps, log_every=args.train_steps, eval_every=0,
                       save_every=0)
  teacher.eval.update(steps_during_training=(4,), final_steps=(64, 1), **evaluation)

  progressive = pd_method.get_config("digits")
  progressive.progressive.update(steps_per_stage=args.steps_per_stage, stage_overrides="",
                                 validation_examples=args.eval_samples)
  progressive.train.update(log_every=args.steps_per_stage, save_every=0)
  progressive.eval.update(**evaluation)

  dmd = distribution_matching.get_config("digits", "dmd2")
  dmd.train.update(num_steps=args.train_steps, log_every=args.train_steps, eval_every=0,
                   save_every=0)
  dmd.eval.update(**evaluation)
  return {"teacher": teacher, "progressive": progressive, "dmd": dmd}


def describe(method, config):
  if method == "progressive":
    return (f"64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1: 6 stages x {config.progressive.steps_per_stage} "
            "steps")
  if method == "dmd":
    return (f"{config.train.num_steps} steps (critic:generator "
            f"{config.dmd.critic_updates_per_generator}:1)")
  return f"{config.train.num_steps} steps"


def programs(method, config):
  """Train-step programs an objective has: one, or DMD's two static phases (a critic-only and a
  critic + generator step) at a critic:generator ratio above 1."""
  return 2 if method == "dmd" and config.dmd.critic_updates_per_generator > 1 else 1


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--methods", default="teacher,progressive,dmd")
  parser.add_argument("--steps-per-stage", type=int, default=5)
  parser.add_argument("--train-steps", type=int, default=20, help="teacher and DMD train steps")
  parser.add_argument("--eval-samples", type=int, default=256)
  parser.add_argument("--name", default=None)
  parser.add_argument("--no-docs", action="store_true")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps_per_stage, args.train_steps, args.eval_samples = 2, 10, 128
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  import jax
  from jdistill import methods
  drivers = {name: methods.train for name in ("teacher", "progressive", "dmd")}

  machine = common.machine_info()
  if common.busy_warning(machine):
    print(common.busy_warning(machine), flush=True)
  log = CompileLog()
  rows, details = [], {}
  all_configs = configs(args)
  for method in common.parse_list(args.methods):
    config = all_configs[method]
    jax.clear_caches()              # each method pays for its own compilations
    log.reset()
    with tempfile.TemporaryDirectory() as workdir:
      start = time.time()
      drivers[method](config, workdir)
      wall = time.time() - start
    functions = log.summary()
    step = functions.get("train_step", dict(compilations=0, total_seconds=0.0, xla=0.0))
    rows.append(dict(
        key=method, method=method, schedule=describe(method, config),
        train_step_programs=programs(method, config),
        train_step_compilations=step["compilations"],
        train_step_compile_seconds=step["total_seconds"], train_step_xla_seconds=step.get("xla", 0.0),
        compilations=sum(f["compilations"] for f in functions.values()),
        compile_seconds=round(sum(f["total_seconds"] for f in functions.values()), 3),
        wall_seconds=round(wall, 1)))
    details[method] = functions
    print(f"{method}: train_step compiled {step['compilations']}x "
          f"({step['total_seconds']:.1f} s); {rows[-1]['compilations']} compilations in all "
          f"({rows[-1]['compile_seconds']:.1f} s) in a {wall:.0f} s run", flush=True)

  print()
  common.print_table(HEADER, [format_row(r) for r in rows])
  name = args.name or common.default_name("compile_count", quick=args.quick)
  path = common.write_results(name, "compile_count", vars(args), METRICS, rows, machine,
                              functions=details)
  print(f"wrote {os.path.relpath(path, common.ROOT)}")
  if not args.no_docs:
    common.render_docs()
  bad = [r["method"] for r in rows if r["train_step_compilations"] != r["train_step_programs"]]
  if bad:
    sys.exit(f"the train step compiled more often than it has programs (or never) for: {', '.join(bad)}")
  return rows


HEADER = ["objective", "run", "train-step programs", "train-step compilations", "train-step compile s",
          "all compilations", "all compile s", "run wall s"]
METRICS = {"train_step_compilations": "lower", "train_step_compile_seconds": "lower",
           "compilations": "lower"}


def format_row(r):
  return [r["method"], r["schedule"], r.get("train_step_programs", 1), r["train_step_compilations"],
          f"{r['train_step_compile_seconds']:.1f}", r["compilations"], f"{r['compile_seconds']:.1f}",
          f"{r['wall_seconds']:.0f}"]


if __name__ == "__main__":
  main()
