"""Train-step throughput and MFU of jdistill's compiled steps next to a PyTorch peer (diffusers'
UNet2DModel with the same architecture and the same step, eager and torch.compile), measured in
one process, alternating, median of several repeats.

  python benchmarks/train_step.py                  # the full grid (prints its estimated run time)
  python benchmarks/train_step.py --quick          # a smoke test: 0.5M, 8x8, batch 8
  python benchmarks/train_step.py --sizes=0.5M --resolutions=8 --batch=64 --steps=progressive
  python benchmarks/train_step.py --dtype=bf16     # on an accelerator: bf16 compute, bf16 peak

Steps: 'teacher' (denoising: one forward + backward), 'progressive' (two teacher forwards + student
forward/backward) and 'dmd' (DMD2: a critic and a generator update per step). Ours is the real
train step: the objective from jdistill/objectives, jitted by train.loop.compile_step on a
one-device mesh, lowered and compiled ahead of time (state donated). MFU = XLA cost-analysis FLOPs
of that compiled step / step time / the peak FLOP/s of a large matmul measured in the same run.
Writes benchmarks/results/<name>.json and re-renders docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

KINDS = ("teacher", "progressive", "dmd")
# forward-pass equivalents per example (backward = 2 forwards), for the run-time estimate only
FORWARDS = {"teacher": 3, "progressive": 5, "dmd": 9}
PROGRESSIVE_STEPS = (8, 4)      # one two-step stage: the teacher takes 2 DDIM steps per student step


def make_config(kind: str, size: str, resolution: int, batch: int, dtype: str):
  """The library's config for `kind`, with a benchmark U-Net. DMD2 updates the generator at every
  step (critic_updates_per_generator=1) so each step does both updates, without the digits
  preset's DMD1 regression term."""
  from jdistill.methods import distribution_matching, progressive, teacher
  if kind == "teacher":
    config = teacher.get_config("digits")
  elif kind == "progressive":
    config = progressive.get_config("digits")
  elif kind == "dmd":
    config = distribution_matching.get_config("digits", "dmd2")
    config.dmd.update(critic_updates_per_generator=1, regression_weight=0.0)   # the DMD2 step
  else:
    raise ValueError(f"--steps: unknown {kind!r}; choose from {KINDS}")
  common.set_model(config, size, resolution, dtype)
  config.data.batch_size = batch
  return config


@dataclasses.dataclass
class BenchExperiment:
  """The parts of train.setup.Experiment that the objectives' make_objective functions read."""
  config: Any
  denoiser: Any
  schedule: Any
  data_shape: tuple

  def optimizer(self, optim=None):
    from jdistill.objectives import state as state_lib
    return state_lib.make_optimizer(optim or self.config.optim)


class Ours:
  """jdistill's compiled train step for one row; `step()` runs one step and blocks."""

  def __init__(self, kind, config, resolution, batch):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jdistill.diffusion.schedules import make_schedule, path_of
    from jdistill.models.denoiser import make_denoiser
    from jdistill import partitioning
    from jdistill.methods import distribution_matching, progressive, teacher as teacher_method
    from jdistill.objectives import distribution_matching as dm, progressive as pd
    from jdistill.train import loop

    shape = (resolution, resolution, common.DATA_CHANNELS)
    denoiser = make_denoiser(config.model, shape, config.diffusion.parameterization,
                             path_of(config.diffusion.schedule))
    exp = BenchExperiment(config, denoiser, make_schedule(config.diffusion.schedule), shape)
    mesh = partitioning.make_mesh(1, jax.devices()[:1])
    boxed = jax.eval_shape(lambda: denoiser.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"])
    param_shardings = partitioning.shardings_for(boxed, mesh)
    teacher = jax.jit(lambda r: nn.unbox(denoiser.init(r, jnp.zeros((1, *shape)))["params"]),
                      out_shardings=param_shardings)(jax.random.key(1))
    self.params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(teacher)))
    if kind == "teacher":
      objective = teacher_method.make_objective(exp, 1000)
      compiled = loop.compile_step(objective, mesh)
      self.state = loop.init_state(objective, compiled, jax.random.key(0))
      self.frozen, self.stage = None, None
    else:
      if kind == "progressive":
        objective = progressive.make_objective(exp)
        self.stage = pd.make_stage(pd.nested_grids(PROGRESSIVE_STEPS), 0, 1000)
        frozen = pd.ProgressiveFrozen
      else:
        objective = distribution_matching.make_objective(exp, 1000)
        self.stage = None
        frozen = dm.DistributionMatchingFrozen
      compiled = loop.compile_step(objective, mesh, frozen_shardings=frozen(teacher=param_shardings))
      self.state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)(teacher)
      self.frozen = frozen(teacher=teacher)
    x = np.random.RandomState(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)
    self.batch = {"x": jax.device_put(x, partitioning.batch_sharding(mesh))}
    self.rng = jax.random.key(2)
    start = time.perf_counter()
    self.executable = compiled.fn.lower(self.state, self.batch, self.rng, self.frozen,
                                        self.stage).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops = common.xla_flops(self.executable)
    memory = self.executable.memory_analysis()
    self.temp_bytes = int(getattr(memory, "temp_size_in_bytes", 0) or 0) if memory else 0
    available = common.available_memory_bytes()
    if available and self.temp_bytes > 0.8 * available:   # skip the row rather than be OOM-killed
      raise MemoryError(f"the step needs {self.temp_bytes / 1e9:.1f} GB of temporaries, "
                        f"{available / 1e9:.1f} GB available")
    if kind == "progressive":     # XLA counts the teacher's fori_loop body once: add the others
      forward = jax.jit(lambda p, z, l: denoiser.predict(p, z, l)).lower(
          teacher, self.batch["x"], jnp.zeros((batch,))).cost_analysis()
      self.flops += (int(self.stage.teacher_substeps) - 1) * forward["flops"]

  def step(self):
    import jax
    self.state, metrics = self.executable(self.state, self.batch, self.rng, self.frozen, self.stage)
    jax.block_until_ready((self.state, metrics))


def forward_flops(size, resolution, dtype="f32"):
  """XLA's FLOPs of one forward pass on one example (from the lowered HLO; no compilation)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jdistill.config import base_config
  from jdistill.models.denoiser import make_denoiser
  config = common.set_model(base_config("digits"), size, resolution, dtype)
  shape = (1, resolution, resolution, common.DATA_CHANNELS)
  denoiser = make_denoiser(config.model, shape[1:], "v")
  params = jax.eval_shape(lambda: nn.unbox(denoiser.init(jax.random.key(0), jnp.zeros(shape))["params"]))
  lowered = jax.jit(lambda p, z, l: denoiser.predict(p, z, l).x0).lower(
      params, jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32))
  return float(lowered.cost_analysis()["flops"])


def repeats_for(seconds_per_step: float, args) -> int:
  """`--repeats`, fewer for slow rows (each framework gets about --row-seconds), at least 3."""
  return int(max(args.min_repeats, min(args.repeats, args.row_seconds // max(seconds_per_step, 1e-9))))


def estimate_seconds(grid, peers, peak, args, efficiency=0.5):
  """A rough run time: FLOPs at `efficiency` of the matmul peak (this CPU's MFU was 30-70%), the
  warm-up, flop-count and timed calls of every framework, and the compilations."""
  total, flops_cache = 0.0, {}
  for kind, size, resolution, batch in grid:
    if (size, resolution) not in flops_cache:
      flops_cache[size, resolution] = forward_flops(size, resolution, args.dtype)
    step = FORWARDS[kind] * batch * flops_cache[size, resolution] / (peak * efficiency)
    timed = repeats_for(step, args) * max(step, common.MIN_SAMPLE_SECONDS)
    total += (1 + 2 * len(peers)) * step + (1 + len(peers)) * timed + 15.0 * (1 + (kind == "dmd"))
    total += 30.0 * ("compile" in peers)
  return total


def measure_row(kind, size, resolution, batch, peers, args, peak):
  config = make_config(kind, size, resolution, batch, args.dtype)
  row = dict(key=f"{kind}/{size}/{resolution}x{resolution}/b{batch}/{args.dtype}", step=kind,
             size=size, resolution=resolution, batch=batch, dtype=args.dtype)
  ours = Ours(kind, config, resolution, batch)
  row.update(params=ours.params, flops_per_step=ours.flops, compile_seconds=ours.compile_seconds,
             xla_temp_bytes=ours.temp_bytes)
  fns, first = {"jdistill": ours.step}, {"jdistill": common.time_once(ours.step, args.clock)}
  for peer in peers:
    try:
      from benchmarks import peer_torch   # only with a peer: --peer=none runs without torch
      model = peer_torch.Peer(kind, config, resolution, batch, dtype=args.dtype,
                              compile=peer == "compile")
      first[peer] = common.time_once(model.step)         # torch.compile compiles here
      if peer == "compile":
        row["compile_first_step_seconds"] = first[peer]
        first[peer] = common.time_once(model.step, args.clock)
      else:
        row["peer_params"] = model.params
        row["peer_counted_flops"] = model.flops()         # one more step, under torch's counter
      fns[peer] = model.step
    except Exception as e:  # noqa: BLE001 - torch.compile fails in many ways; record and go on
      row[f"{peer}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      print(f"  {peer} peer failed: {row[f'{peer}_error']}", flush=True)
  slowest = max(first.values())
  repeats = repeats_for(slowest, args)
  inner = {name: common.inner_count(seconds) for name, seconds in first.items()}
  times = common.time_alternating(fns, repeats, inner, clock=args.clock)
  row.update(repeats=repeats, inner=inner)
  for name, samples in times.items():
    seconds = float(np.median(samples))
    row[f"{name}_step_seconds"] = seconds
    row[f"{name}_step_seconds_all"] = samples
    row[f"{name}_samples_per_s"] = batch / seconds
    row[f"{name}_mfu"] = ours.flops / seconds / peak
  for peer in peers:
    if f"{peer}_step_seconds" in row:
      row[f"ratio_vs_{peer}"] = row["jdistill_samples_per_s"] / row[f"{peer}_samples_per_s"]
  return row


def fmt_row(row, peers):
  peer_params = f"{row['peer_params'] / 1e6:.3f}M" if "peer_params" in row else "-"
  cells = [row["step"], row["size"], f"{row['resolution']}x{row['resolution']}", row["batch"],
           f"{row['params'] / 1e6:.3f}M / {peer_params}", f"{row['jdistill_samples_per_s']:.1f}"]
  for peer in peers:
    cells.append(f"{row[f'{peer}_samples_per_s']:.1f}" if f"{peer}_samples_per_s" in row else "failed")
  for peer in peers:
    cells.append(f"{row[f'ratio_vs_{peer}']:.2f}x" if f"ratio_vs_{peer}" in row else "-")
  cells.append(f"{100 * row['jdistill_mfu']:.1f}%")
  cells += [f"{100 * row[f'{peer}_mfu']:.1f}%" if f"{peer}_mfu" in row else "-" for peer in peers]
  return cells


def header(peers):
  return (["step", "U-Net", "res", "batch", "params (ours / peer)", "jdistill samples/s"]
          + [f"torch {p} samples/s" for p in peers] + [f"ratio vs {p}" for p in peers]
          + ["MFU jdistill"] + [f"MFU {p}" for p in peers])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="0.5M, 8x8, batch 8, 2 repeats")
  parser.add_argument("--sizes", default=",".join(common.SIZES))
  parser.add_argument("--resolutions", default="8,16,32")
  parser.add_argument("--batch", default="64,128,256")
  parser.add_argument("--steps", default=",".join(KINDS))
  parser.add_argument("--peer", default="eager,compile", help="eager, compile, or none")
  parser.add_argument("--dtype", default="f32", choices=sorted(common.DTYPES))
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--min-repeats", type=int, default=3)
  parser.add_argument("--row-seconds", type=float, default=20.0,
                      help="time per framework and row that bounds the repeats of slow rows")
  parser.add_argument("--threads", type=int, default=0,
                      help="pin both frameworks to this many cores (0: all)")
  parser.add_argument("--clock", default="wall", choices=sorted(common.CLOCKS),
                      help="wall time, or this process's CPU time (with --threads=1 on a busy machine)")
  parser.add_argument("--name", default=None, help="results/<name>.json (default train_step_<backend>)")
  parser.add_argument("--estimate-only", action="store_true")
  parser.add_argument("--no-docs", action="store_true", help="do not re-render docs/benchmarks.md")
  args = parser.parse_args(argv)
  common.limit_threads(args.threads)
  if args.quick:
    args.sizes, args.resolutions, args.batch = "0.5M", "8", "8"
    args.repeats = args.min_repeats = 2
  peers = [] if args.peer == "none" else common.parse_list(args.peer)
  if peers:
    try:
      from benchmarks import peer_torch  # noqa: F401
    except ImportError as e:
      sys.exit(f"the PyTorch peer needs torch and diffusers: pip install -e '.[bench]' ({e}); "
               "or pass --peer=none")
  grid = [(kind, size, resolution, batch)
          for size in common.parse_list(args.sizes) for resolution in common.parse_list(args.resolutions, int)
          for batch in common.parse_list(args.batch, int) for kind in common.parse_list(args.steps)]
  for kind, size, *_ in grid:
    if kind not in KINDS or size not in common.SIZES:
      sys.exit(f"unknown step {kind!r} or size {size!r}: steps {KINDS}, sizes {tuple(common.SIZES)}")

  machine = common.machine_info()
  peak = common.peak_flops(args.dtype, clock=args.clock)
  if common.busy_warning(machine):
    print(common.busy_warning(machine), flush=True)
  print(f"{common.device_label(machine)} ({machine['backend']}, {machine['cores']} cores), "
        f"{args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
  estimate = estimate_seconds(grid, peers, peak, args)
  print(f"{len(grid)} rows x (jdistill + {', '.join(peers) or 'no peer'}): estimated "
        f"{estimate / 60:.0f} min", flush=True)
  if args.estimate_only:
    return None

  rows, start = [], time.time()
  name = args.name or common.default_name("train_step", args.dtype, args.quick)
  settings = dict(vars(args), peers=peers, peak_flops=peak)
  for i, (kind, size, resolution, batch) in enumerate(grid):
    row_start = time.time()
    try:
      row = measure_row(kind, size, resolution, batch, peers, args, peak)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record the row and go on
      row = dict(key=f"{kind}/{size}/{resolution}x{resolution}/b{batch}/{args.dtype}", step=kind,
                 size=size, resolution=resolution, batch=batch, dtype=args.dtype,
                 error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    row["wall_seconds"] = time.time() - row_start
    rows.append(row)
    print(f"[{i + 1}/{len(grid)}] " + (" | ".join(str(c) for c in fmt_row(row, peers))
                                       if "error" not in row else f"{row['key']} failed: {row['error']}")
          + f"  ({row['wall_seconds']:.0f}s)", flush=True)
    gc.collect()
    common.write_results(name, "train_step", settings, metrics=METRICS, rows=rows, machine=machine,
                         seconds=time.time() - start)
  peak_end = common.peak_flops(args.dtype, clock=args.clock)
  settings["peak_flops_end"] = peak_end
  path = common.write_results(name, "train_step", settings, metrics=METRICS, rows=rows,
                              machine=machine, seconds=time.time() - start)
  print()
  common.print_table(header(peers), [fmt_row(r, peers) for r in rows if "error" not in r])
  print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s at the start, {peak_end / 1e9:.1f} at the end; "
        f"{(time.time() - start) / 60:.1f} min; wrote {os.path.relpath(path, common.ROOT)}")
  if not args.no_docs:
    common.render_docs()
  return rows


METRICS = {"jdistill_samples_per_s": "higher", "eager_samples_per_s": "higher",
           "compile_samples_per_s": "higher", "compile_seconds": "lower"}


if __name__ == "__main__":
  main()
