"""Renders docs/benchmarks.md from the result files in benchmarks/results/ (never edit the page by
hand: rerun a benchmark, or this script).

  python benchmarks/report.py [--out=docs/benchmarks.md] [RESULT.json ...]

Without files it takes every `<benchmark>_<backend>[_bf16].json` there (a `_quick` file only when
its full run is missing) plus the before/after pair of the CPU fixes (`fixes_before_*.json`,
`fixes_after_*.json`).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
BENCHMARKS = ("train_step", "compile_count", "sampling")
KIND_ORDER = {"teacher": 0, "progressive": 1, "dmd": 2}
SIZE_ORDER = {"0.5M": 0, "5M": 1, "35M": 2}


def load(path):
  with open(path) as f:
    result = json.load(f)
  result["path"] = os.path.relpath(path, ROOT)
  return result


def default_files():
  names = {os.path.basename(p)[:-5]: p for p in glob.glob(os.path.join(RESULTS, "*.json"))}
  chosen = []
  for name, path in sorted(names.items()):
    if not name.startswith(BENCHMARKS):
      continue
    if name.endswith("_quick") and name[:-len("_quick")] in names:
      continue
    chosen.append(path)
  return chosen


def machine_line(result):
  m, s = result["machine"], result.get("settings", {})
  device = m["cpu"] if m.get("backend") == "cpu" else f"{m.get('device')} ({m.get('backend')})"
  parts = [f"**{device}**", f"{m.get('cores')} cores"]
  if s.get("threads"):
    parts.append(f"pinned to {s['threads']} core(s)")
  parts.append(f"jax {m.get('jax')}")
  if m.get("torch"):
    parts.append(f"torch {m['torch']}, diffusers {m.get('diffusers')}")
  parts.append(f"{m.get('date', '?')[:10]}, commit {m.get('commit', '?')}")
  if m.get("load_average"):
    parts.append(f"load average {m['load_average'][0]:.1f} at the start")
  if s.get("clock") == "cpu":
    parts.append("**process CPU time** (not wall time)")
  if s.get("quick"):
    parts.append("**--quick settings: a smoke test, not a measurement**")
  return ", ".join(parts) + f" (`{result['path']}`)"


def table(header, rows):
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def fmt(value, spec=".1f", suffix=""):
  return "-" if value is None else f"{value:{spec}}{suffix}"


def row_order(r):
  return (KIND_ORDER.get(r.get("step"), 9), SIZE_ORDER.get(r.get("size"), 9), r.get("resolution", 0),
          r.get("batch", 0))


# ----------------------------------------------------------------------------- sections

TRAIN_STEP_INTRO = """\
Samples per second of one train step, jdistill next to a PyTorch peer, measured in the same
process: the two frameworks alternate (rotating order), each timing sample runs enough steps to
last 0.3 s, and the table shows medians (`--repeats`, fewer for slow rows, at least 3).
- **jdistill**: the library's objective (`objectives/denoising.py`, `progressive.py`,
  `distribution_matching.py`) jitted by `train.loop.compile_step` on one device, compiled ahead of
  time; the state is donated as in training.
- **torch eager / torch.compile**: diffusers' `UNet2DModel` with the same architecture (parameter
  counts in the table) running the same step (`benchmarks/peer_torch.py` says exactly what each
  step does), Adam with torch's fused kernel, EMA, grad-norm clipping, the skip of non-finite steps.
- **teacher**: one forward + backward. **progressive**: two no-grad teacher DDIM steps, then the
  student's forward + backward. **dmd**: DMD2 with one critic and one generator update per step
  (generator forward without gradient, critic forward/backward, generator forward/backward,
  teacher and critic forwards without gradient).
- **MFU**: FLOPs of the compiled step from XLA's cost analysis (plus the teacher passes XLA counts
  once inside the progressive step's loop), divided by the step time and by the peak FLOP/s of a
  2048x2048 matmul measured in the same run. The peers' MFU uses the same FLOP count.
- U-Nets: 0.5M = 24 channels x (1, 2); 5M = 56 x (1, 2, 2); 35M = 128 x (1, 2, 2, 2), the DDPM
  CIFAR-10 U-Net; two ResNet blocks per level, one-head attention at half the input resolution
  (and in the middle block), GroupNorm (8 groups; 32 for 35M), 3 image channels."""


def commit_note(result):
  """Which steps and which code a grid measured, for its heading."""
  steps = sorted({r["step"] for r in result["rows"]})
  return ", ".join(steps) + f" (commit {result['machine'].get('commit', '?')})"


def train_step_section(result):
  settings = result.get("settings", {})
  peers = settings.get("peers", [])
  dtype = settings.get("dtype", "f32")
  batches = sorted({r["batch"] for r in result["rows"]})
  sizes = sorted({r["size"] for r in result["rows"]}, key=lambda size: SIZE_ORDER.get(size, 9))
  lines = [f"### {result['machine'].get('backend', '?').upper()}, {dtype}, U-Net "
           + ", ".join(sizes) + ", batch " + ", ".join(map(str, batches))
           + f", {commit_note(result)}", "", machine_line(result),
           "", f"Matmul peak {fmt(settings.get('peak_flops', 0) / 1e9)} GFLOP/s"
           + (f" at the start, {fmt(settings['peak_flops_end'] / 1e9)} at the end"
              if settings.get("peak_flops_end") else "") + ".", ""]
  header = (["step", "U-Net", "params ours / peer", "res", "batch", "jdistill samples/s"]
            + [f"torch {p} samples/s" for p in peers] + [f"jdistill / {p}" for p in peers]
            + ["MFU jdistill"] + [f"MFU {p}" for p in peers]
            + ["XLA compile s"] + [f"torch.compile 1st step s" for p in peers if p == "compile"])
  rows, failed = [], [r for r in result["rows"] if "error" in r]
  for r in sorted((r for r in result["rows"] if "error" not in r), key=row_order):
    cells = [r["step"], r["size"], f"{r['params'] / 1e6:.3f}M / "
             + (f"{r['peer_params'] / 1e6:.3f}M" if r.get("peer_params") else "-"),
             f"{r['resolution']}x{r['resolution']}", r["batch"], fmt(r.get("jdistill_samples_per_s"))]
    cells += [fmt(r.get(f"{p}_samples_per_s")) if f"{p}_error" not in r else "failed" for p in peers]
    cells += [fmt(r.get(f"ratio_vs_{p}"), ".2f", "x") for p in peers]
    cells += [fmt(100 * r["jdistill_mfu"], ".1f", "%")]
    cells += [fmt(100 * r[f"{p}_mfu"], ".1f", "%") if f"{p}_mfu" in r else "-" for p in peers]
    cells += [fmt(r.get("compile_seconds"))]
    cells += [fmt(r.get("compile_first_step_seconds")) for p in peers if p == "compile"]
    rows.append(cells)
  lines += table(header, rows)
  if failed:
    lines += ["", "Rows that failed: " + "; ".join(f"{r['key']} ({r['error']})" for r in failed)]
  errors = sorted({r[f"{p}_error"] for r in result["rows"] for p in peers if f"{p}_error" in r})
  if errors:
    lines += ["", "torch.compile / peer failures: " + "; ".join(errors)]
  if "eager" in peers:
    lines += ["", verdict(result["rows"])]
  return lines


def verdict(rows):
  """One line per step kind: the range of jdistill / torch eager, and the rows below 1."""
  parts = []
  for kind in sorted({r["step"] for r in rows}, key=lambda k: KIND_ORDER.get(k, 9)):
    ratios = [(r["ratio_vs_eager"], r) for r in rows
              if r.get("step") == kind and "ratio_vs_eager" in r]
    if not ratios:
      continue
    low = [f"{r['size']} {r['resolution']}x{r['resolution']} b{r['batch']} ({x:.2f}x)"
           for x, r in sorted(ratios, key=lambda p: p[0]) if x < 1.0]
    parts.append(f"- **{kind}**: jdistill / torch eager from {min(x for x, _ in ratios):.2f}x to "
                 f"{max(x for x, _ in ratios):.2f}x; "
                 + (f"slower than eager at {', '.join(low)}" if low else "at least as fast at every row"))
  return "\n".join(parts)


def compile_section(result):
  lines = [machine_line(result), ""]
  header = ["objective", "run", "train-step programs", "train-step compilations",
            "train-step compile s", "all compilations", "all compile s", "run wall s"]
  rows = [[r["method"], r["schedule"], r.get("train_step_programs", 1), r["train_step_compilations"],
           fmt(r["train_step_compile_seconds"]), r["compilations"], fmt(r["compile_seconds"]),
           fmt(r["wall_seconds"], ".0f")] for r in result["rows"]]
  lines += table(header, rows)
  functions = result.get("functions", {}).get("progressive")
  if functions:
    lines += ["", "Every compiled function of the progressive run (compile s = trace + lower + XLA):", ""]
    lines += table(["function", "compilations", "compile s"],
                   [[name, f["compilations"], fmt(f["total_seconds"], ".2f")]
                    for name, f in sorted(functions.items(), key=lambda kv: -kv[1]["total_seconds"])
                    if f["compilations"]])
  return lines


def sampling_section(result):
  settings = result.get("settings", {})
  full, longest = settings.get("full_steps"), settings.get("longest_teacher_steps")
  lines = [machine_line(result), "",
           f"{settings.get('model_description', '?')}; {settings.get('samples')} samples per call "
           f"(one batch), median of {settings.get('repeats')}.", ""]
  both = longest != full
  rows = [[r["role"], r["steps"], fmt(r["ms_per_sample"], ".3f"),
           fmt(r.get("speedup_vs_full"), ".1f", "x")]
          + ([fmt(r.get("speedup_vs_longest"), ".1f", "x")] if both else []) for r in result["rows"]]
  lines += table(["model", "steps", "ms / sample", f"speedup vs the {full}-step teacher"]
                 + ([f"vs the {longest}-step teacher"] if both else []), rows)
  one = next((r for r in result["rows"] if r["role"] == "student" and r["steps"] == 1), None)
  if one and one.get("speedup_vs_full"):
    lines += ["", f"The 1-step student samples **{one['speedup_vs_full']:.0f}x** faster than the "
              f"{full}-step teacher it was distilled from"
              + (f" ({one['speedup_vs_longest']:.0f}x faster than {longest} steps)." if both else ".")]
  return lines


def fixes_section(before, after):
  lines = ["Progressive step, jdistill / torch eager, before and after the fixes below, measured "
           "at batch 64 with both frameworks pinned to one core and timed by process CPU time (the "
           "machine was shared with other jobs):", "",
           "- before: " + machine_line(before), "- after: " + machine_line(after), ""]
  after_rows = {r["key"]: r for r in after["rows"]}
  rows = []
  for r in sorted(before["rows"], key=row_order):
    a = after_rows.get(r["key"])
    if a is None:
      continue
    rows.append([r["step"], r["size"], f"{r['resolution']}x{r['resolution']}", r["batch"],
                 fmt(r["jdistill_samples_per_s"]), fmt(a["jdistill_samples_per_s"]),
                 fmt(a["jdistill_samples_per_s"] / r["jdistill_samples_per_s"], ".2f", "x"),
                 fmt(r.get("ratio_vs_eager"), ".2f", "x"), fmt(a.get("ratio_vs_eager"), ".2f", "x")])
  lines += table(["step", "U-Net", "res", "batch", "jdistill samples/s before", "after", "speedup",
                  "jdistill / eager before", "after"], rows)
  return lines


FIXES_TEXT = """\
What was found by profiling (XLA's per-thunk trace with `--xla_cpu_enable_xprof_traceme`, and
torch's profiler), and fixed in the library:
1. **Convolutions on maps smaller than the kernel** (the 2x2 and 1x1 levels of the 5M and 35M U-Nets
   at 8x8 and 16x16): XLA swaps such a convolution's operands, and its CPU backend runs the result
   5-40x slower than the equivalent matmul (a 3x3 conv of 224 -> 112 channels on 2x2 maps: 11.5 ms
   vs 0.7 ms). `models/unet.py::Conv` now computes them as one matmul over gathered patches
   (same params, same function; taps that only see padding are skipped).
2. **Weight gradients of convolutions**: the YNNPACK convolution fusion that recent jaxlibs enable
   on CPU computes them about 2x slower than XLA's own convolution runtime (16.0 vs 6.9 ms for
   3x3x24x24 at 32x32, batch 64). Train steps compiled for CPU keep YNNPACK for matmuls only
   (`train/loop.py::CPU_COMPILER_OPTIONS`; a user's `XLA_FLAGS` wins).
3. **DMD at 1:1 critic:generator updates** compiled the generator update inside a `lax.cond`; XLA:CPU
   leaves the backward convolutions in a conditional branch un-canonicalised, 4-8x slower. At 1:1
   (TDM's default, and this benchmark) the step now calls the update directly. At DMD2's default
   5:1 the loop compiles two programs (critic-only; critic + generator) and picks one per step
   (`objective.phase_of`): digits DMD2 at batch 32 went from 1.71 to 8.84 train steps/s (5.2x).
4. **GroupNorm** (after the batch-64 grid and the 0.5M/5M batch-128/256 grid above were measured;
   the 35M batch-128/256 grid was measured with it): statistics from per-channel sums over
   H x W, grouped and broadcast back by a (C, G) membership matmul (`models/unet.py::GroupNorm`,
   nn.GroupNorm's params and function). Progressive step at batch 64 and 32x32, the two versions
   alternating in one process: 0.5M 52.8 -> 56.0, 5M 17.7 -> 18.7 samples/s (+6%). The progressive
   rows re-measured with it (`results/train_step_cpu_progressive_groupnorm.json`, batch 64):
   jdistill / torch eager 1.22, 0.99, 0.82 (0.5M at 8, 16, 32 px), 1.06, 1.00, 0.91 (5M), 0.91,
   0.85, 0.85 (35M), against 1.08, 0.90, 0.77, 1.00, 0.93, 0.74, 0.91, 0.81, 0.86 in the grid
   above (benchmarks/README.md).

Tried and not kept (no gain inside the whole step, though faster in isolation): an earlier GroupNorm
with per-channel statistics grouped by reshapes (plain and with a custom VJP), SiLU via tanh, an explicit
im2col weight gradient, a custom-VJP convolution, optimization barriers between normalisation and
convolutions, attention with the softmax sum taken by the value matmul (8-22% slower)."""


def render(results, fixes):
  by_kind = {b: [r for r in results if r.get("benchmark") == b] for b in BENCHMARKS}
  lines = ["# Benchmarks", "",
           "<!-- generated by benchmarks/report.py from benchmarks/results/*.json: do not edit -->",
           "",
           "Every number here was measured by the scripts in `benchmarks/` (one command each, see",
           "[benchmarks/README.md](../benchmarks/README.md)); `python benchmarks/compare.py A.json "
           "B.json` prints the ratio between two result files and flags regressions.", ""]
  if not any(by_kind.values()):
    lines += ["No results yet: run the benchmarks."]
  if by_kind["train_step"]:
    lines += ["## Train-step throughput, MFU and the PyTorch peer", "", TRAIN_STEP_INTRO, ""]
    for result in by_kind["train_step"]:
      lines += train_step_section(result) + [""]
  if by_kind["compile_count"]:
    lines += ["## Compile count and compile time", "",
              "Whole runs of the real drivers (`benchmarks/compile_count.py`); every XLA compilation "
              "is counted per function through `jax.monitoring`. Progressive stages feed the step "
              "count, stage length and teacher sub-steps as traced values, so the train step "
              "compiles once for the whole schedule. DMD2 at its 5:1 critic:generator ratio has two "
              "train-step programs by design (a critic-only and a critic + generator step, picked by "
              "the loop instead of a `lax.cond`), each compiled once.", ""]
    for result in by_kind["compile_count"]:
      lines += compile_section(result) + [""]
  if by_kind["sampling"]:
    lines += ["## Sampling speed", ""]
    for result in by_kind["sampling"]:
      lines += sampling_section(result) + [""]
  if fixes:
    lines += ["## CPU fixes found by these benchmarks", ""] + fixes_section(*fixes)
    lines += ["", FIXES_TEXT, ""]
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="*")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
  args = parser.parse_args(argv)
  results = [load(p) for p in (args.files or default_files())]
  before = sorted(glob.glob(os.path.join(RESULTS, "fixes_before_*.json")))
  after = sorted(glob.glob(os.path.join(RESULTS, "fixes_after_*.json")))
  fixes = (load(before[0]), load(after[0])) if before and after else None
  text = render(results, fixes)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  return args.out


if __name__ == "__main__":
  print(f"wrote {main(sys.argv[1:])}")
