"""Shared pieces of the benchmarks: model sizes, machine info, the measured peak, XLA FLOPs,
alternating timing, and the results files (benchmarks/results/<name>.json) that report.py renders
and compare.py compares."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from typing import Callable, Dict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# U-Net sizes (config.model fields). Attention sits at level 1 (resolution / 2) for every input
# size, so a size has the same parameter count at 8x8, 16x16 and 32x32; '35M' is the DDPM CIFAR-10
# U-Net (configs/*.py:cifar10 without dropout).
SIZES = {
    "0.5M": dict(channels=24, channel_mult=(1, 2), norm_groups=8),
    "5M": dict(channels=56, channel_mult=(1, 2, 2), norm_groups=8),
    "35M": dict(channels=128, channel_mult=(1, 2, 2, 2), norm_groups=32),
}
DATA_CHANNELS = 3
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def set_model(config, size: str, resolution: int, dtype: str = "f32"):
  """config.model for a benchmark size at `resolution` (in place; returns config)."""
  if size not in SIZES:
    raise ValueError(f"--sizes: unknown {size!r}; choose from {sorted(SIZES)}")
  config.model.update(name="unet", num_res_blocks=2, attention_resolutions=(resolution // 2,),
                      num_heads=1, dropout=0.0, num_classes=0, dtype=DTYPES[dtype], **SIZES[size])
  return config


def parse_list(text, cast=str):
  return [cast(v) for v in str(text).replace(" ", "").split(",") if v]


# ----------------------------------------------------------------------------- machine

def limit_threads(threads: int):
  """Pins this process to its first `threads` cores (XLA:CPU sizes its thread pool from the
  affinity mask) and caps OpenMP/torch threads. Call before importing jax or torch."""
  if not threads:
    return
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, set(cores[:threads]))
  os.environ["OMP_NUM_THREADS"] = str(threads)
  os.environ["MKL_NUM_THREADS"] = str(threads)


def available_memory_bytes():
  """Memory a step may still use: the accelerator's free memory, or the host's MemAvailable."""
  import jax
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def busy_warning(info) -> str:
  """A warning when other processes keep the cores busy (timings, torch's especially, degrade)."""
  load = info.get("load_average", [0.0])[0]
  cores = info.get("cores_available") or info.get("cores") or 1
  if load > 0.5 * cores:
    return (f"WARNING: load average {load:.1f} on {cores} cores before the run: other processes "
            "are busy, so timings are noisy (OpenMP-threaded torch can slow down many-fold when "
            "its threads are descheduled); benchmark on a quiet machine")
  return ""


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def git_commit() -> str:
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine_info() -> dict:
  import jax
  info = dict(
      date=datetime.datetime.now().isoformat(timespec="seconds"), host=platform.node(),
      cpu=cpu_model(), cores=os.cpu_count(),
      cores_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      python=platform.python_version(), jax=jax.__version__, backend=jax.default_backend(),
      device=jax.devices()[0].device_kind, device_count=jax.device_count(), commit=git_commit())
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
      info["torch_device"] = torch.cuda.get_device_name()
    import diffusers
    info["diffusers"] = diffusers.__version__
  except ImportError:
    pass
  try:
    info["load_average"] = list(os.getloadavg())
  except OSError:
    pass
  return info


def device_label(info) -> str:
  return info["cpu"] if info["backend"] == "cpu" else info["device"]


# ----------------------------------------------------------------------------- FLOPs

def peak_flops(dtype: str = "f32", n: int = 2048, repeats: int = 5, clock: str = "wall") -> float:
  """Measured FLOP/s of an n x n matmul (jnp.dot, jitted; median of `repeats`)."""
  import jax
  import jax.numpy as jnp
  kind = jnp.dtype(DTYPES[dtype])
  a = jax.random.normal(jax.random.key(0), (n, n), kind)
  b = jax.random.normal(jax.random.key(1), (n, n), kind)
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=kind))
  matmul(a, b).block_until_ready()
  times = [time_once(lambda: matmul(a, b).block_until_ready(), clock) for _ in range(repeats)]
  return 2.0 * n**3 / float(np.median(times))


def xla_flops(compiled) -> float:
  """FLOPs from XLA's cost analysis of a compiled executable (a dict, or a list of per-program
  dicts in some jax versions). XLA counts a while-loop body once, whatever its trip count."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    return float(sum(a.get("flops", 0.0) for a in analysis if a))
  return float((analysis or {}).get("flops", 0.0))


# ----------------------------------------------------------------------------- timing

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(fn: Callable[[], None], clock: str = "wall") -> float:
  start = CLOCKS[clock]()
  fn()
  return CLOCKS[clock]() - start


def time_alternating(fns: Dict[str, Callable[[], None]], repeats: int, inner: Dict[str, int],
                     pause: float = 0.05, clock: str = "wall") -> Dict[str, list]:
  """Seconds per call of each `fns[name]` (which must block until its work is done), measured
  alternately: each repeat times `inner[name]` back-to-back calls of every fn in turn, rotating
  the order between repeats. Returns the per-call seconds of every repeat. `clock='cpu'` counts
  this process's CPU time: with one thread, a busy machine's preemptions do not count."""
  names, now = list(fns), CLOCKS[clock]
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      time.sleep(pause)             # let the other framework's spinning worker threads go idle
      start = now()
      for _ in range(inner[name]):
        fns[name]()
      times[name].append((now() - start) / inner[name])
  return times


MIN_SAMPLE_SECONDS = 0.3


def inner_count(seconds_per_call: float, min_seconds: float = MIN_SAMPLE_SECONDS, cap: int = 50) -> int:
  """Calls per timing sample so that a sample lasts at least `min_seconds`."""
  return int(min(cap, max(1, np.ceil(min_seconds / max(seconds_per_call, 1e-6)))))


# ----------------------------------------------------------------------------- results

def results_path(name: str) -> str:
  return os.path.join(RESULTS, f"{name}.json")


def default_name(benchmark: str, dtype: str = "f32", quick: bool = False) -> str:
  import jax
  name = f"{benchmark}_{jax.default_backend()}"
  if dtype != "f32":
    name += f"_{dtype}"
  return name + ("_quick" if quick else "")


def write_results(name: str, benchmark: str, settings: dict, metrics: dict, rows: list,
                  machine: dict, **extra) -> str:
  """Writes benchmarks/results/<name>.json. `metrics` maps a row field compare.py compares to
  'higher' or 'lower' (which is better); every row has a unique 'key'."""
  os.makedirs(RESULTS, exist_ok=True)
  payload = dict(benchmark=benchmark, name=name, machine=machine, settings=settings,
                 metrics=metrics, rows=rows, **extra)
  path = results_path(name)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
    f.write("\n")
  return path


def print_table(header, rows):
  """A markdown table on stdout (rows of already formatted cells)."""
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(str(c) for c in row) + " |")
  sys.stdout.flush()


def render_docs():
  """Re-renders docs/benchmarks.md from benchmarks/results/ (see report.py)."""
  from benchmarks import report
  path = report.main([])
  print(f"wrote {os.path.relpath(path, ROOT)}")
