"""Sampling speed: milliseconds per sample against the number of steps, for the teacher (DDIM) and
its few-step students, and the speedup of the 1-step student over the teacher's full schedule.

  python benchmarks/sampling.py                    # the bundled digits teacher, about 2 minutes
  python benchmarks/sampling.py --workdir=runs/progressive   # time the run's own students
  python benchmarks/sampling.py --model=35M --resolution=32  # a CIFAR-10-size U-Net (random weights)
  python benchmarks/sampling.py --quick

A progressive / DMD / TDM student is the teacher's U-Net sampled with fewer steps, so without
--workdir the students are timed with the teacher's weights (the time does not depend on them).
Timing is jdistill.eval.evaluate.time_sampling (one compiled N-step sampler, median of repeats).
Writes benchmarks/results/<name>.json and re-renders docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402


def build(args, workdir):
  """(sampler, teacher params, model description)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jdistill.methods import progressive
  from jdistill.diffusion.schedules import make_schedule, path_of
  from jdistill.eval.evaluate import Sampler
  from jdistill.models.denoiser import make_denoiser
  from jdistill.train import setup
  from jdistill.train import teachers as teacher_lib
  config = progressive.get_config("digits")
  config.eval.batch_size = args.samples
  if args.model == "digits":
    exp = setup.build(config, workdir, evaluator=False, record_config=False)
    params = teacher_lib.load_teacher(exp)
    count = sum(p.size for p in jax.tree.leaves(params))
    return exp.sampler, params, f"bundled digits teacher (8x8x1, {count / 1e6:.2f}M params)", exp
  common.set_model(config, args.model, args.resolution, args.dtype)
  shape = (args.resolution, args.resolution, common.DATA_CHANNELS)
  denoiser = make_denoiser(config.model, shape, config.diffusion.parameterization,
                             path_of(config.diffusion.schedule))
  params = jax.jit(lambda r: nn.unbox(denoiser.init(r, jnp.zeros((1, *shape)))["params"]))(
      jax.random.key(0))
  sampler = Sampler(denoiser, make_schedule(config.diffusion.schedule), shape,
                    batch_size=args.samples)
  count = sum(p.size for p in jax.tree.leaves(params))
  return sampler, params, (f"{args.model} U-Net ({args.resolution}x{args.resolution}x3, "
                           f"{count / 1e6:.2f}M params, random weights)"), None


def student_params(exp, workdir, steps):
  """The EMA params of the progressive stage that distilled to `steps` steps in `workdir`."""
  from jdistill.train import checkpoint as ckpt_lib
  found = glob.glob(os.path.join(workdir, "stages", f"*_{steps}steps", "checkpoints"))
  if not found:
    return None
  return ckpt_lib.restore_params(found[0], exp.abstract_params())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--model", default="digits", help="digits, or a benchmark size: "
                      + ", ".join(common.SIZES))
  parser.add_argument("--resolution", type=int, default=32, help="with a benchmark size")
  parser.add_argument("--dtype", default="f32", choices=sorted(common.DTYPES))
  parser.add_argument("--teacher-steps", default="256,64,16,4")
  parser.add_argument("--student-steps", default="4,2,1")
  parser.add_argument("--full-steps", type=int, default=64,
                      help="the teacher schedule the students were distilled from (digits: 64)")
  parser.add_argument("--samples", type=int, default=256, help="samples per timed call (one batch)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workdir", default="", help="a progressive run whose students to time")
  parser.add_argument("--name", default=None)
  parser.add_argument("--no-docs", action="store_true")
  args = parser.parse_args(argv)
  if args.quick:
    args.teacher_steps, args.student_steps, args.samples, args.repeats = "64,4", "2,1", 64, 2
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from jdistill.eval.evaluate import time_sampling

  machine = common.machine_info()
  if common.busy_warning(machine):
    print(common.busy_warning(machine), flush=True)
  teacher_steps = common.parse_list(args.teacher_steps, int)
  student_steps = common.parse_list(args.student_steps, int)
  with tempfile.TemporaryDirectory() as tmp:
    sampler, teacher, description, exp = build(args, tmp)
    print(f"{description}, {args.samples} samples per call, median of {args.repeats}", flush=True)
    rows = []
    for role, steps_list in (("teacher", teacher_steps), ("student", student_steps)):
      for steps in steps_list:
        params, source = teacher, "teacher weights"
        if role == "student" and args.workdir and exp is not None:
          trained = student_params(exp, args.workdir, steps)
          if trained is not None:
            params, source = trained, f"{args.workdir} stage"
        ms = time_sampling(sampler, params, steps, args.samples, args.repeats)
        rows.append(dict(key=f"{role}/{steps}", role=role, steps=steps, ms_per_sample=ms,
                         weights=source))
        print(f"{role} {steps} steps: {ms:.3f} ms/sample", flush=True)
  full = next((r["ms_per_sample"] for r in rows if r["role"] == "teacher"
               and r["steps"] == args.full_steps), None)
  longest = max((r for r in rows if r["role"] == "teacher"), key=lambda r: r["steps"], default=None)
  for row in rows:
    row["speedup_vs_full"] = full / row["ms_per_sample"] if full else None
    row["speedup_vs_longest"] = longest["ms_per_sample"] / row["ms_per_sample"] if longest else None
  print()
  common.print_table(header(args, longest), [format_row(r) for r in rows])
  name = args.name or common.default_name("sampling", args.dtype, args.quick)
  settings = dict(vars(args), model_description=description,
                  longest_teacher_steps=longest["steps"] if longest else None)
  path = common.write_results(name, "sampling", settings, METRICS, rows, machine)
  print(f"wrote {os.path.relpath(path, common.ROOT)}")
  if not args.no_docs:
    common.render_docs()
  return rows


METRICS = {"ms_per_sample": "lower"}


def header(settings, longest_steps):
  longest_steps = longest_steps["steps"] if isinstance(longest_steps, dict) else longest_steps
  return ["model", "steps", "ms / sample", f"speedup vs the {settings.full_steps}-step teacher",
          f"vs the {longest_steps}-step teacher"]


def format_row(r):
  speed = lambda v: f"{v:.1f}x" if v else "-"
  return [r["role"], r["steps"], f"{r['ms_per_sample']:.3f}", speed(r["speedup_vs_full"]),
          speed(r["speedup_vs_longest"])]


if __name__ == "__main__":
  main()
