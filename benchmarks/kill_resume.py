"""kill -9 fault injection for every method: tiny runs SIGKILLed at seeded random wall-clock points
and resumed (the same command again) until they finish must end exactly like an unbroken run.

For each method: one unbroken run, then killed runs until `--kills` kills have landed. A kill comes
at a uniform random time in [0, the unbroken run's wall time) after each (re)start; a run that
finishes before its kill is complete. Each completed run is compared with the unbroken one: every
array of the final Orbax checkpoint of each checkpoint directory (params, EMA, optimizer state)
and of best/, their metadata, the FD numbers of summary.md, the exported models, and the
TensorBoard tensors (scalars, images) as TensorBoard reads them (orphaned events purged), with no
duplicated or missing steps; and every checkpoint step left restores.

  python benchmarks/kill_resume.py --methods=teacher,progressive,dmd2,tdm,multi_teacher --kills=20

prints the table and writes benchmarks/results/kill_resume_<backend>.json (`--name` overrides).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
ENV = dict(os.environ)           # before tests/conftest.py (imported by `prepare`) sets defaults

METHODS = ("teacher", "progressive", "dmd2", "tdm", "multi_teacher")
CONFIG_FILES = {"teacher": "teacher", "progressive": "progressive", "dmd2": "dmd", "tdm": "tdm",
                "multi_teacher": "multi_teacher"}
# TensorBoard tags of wall-clock measures (clu's ReportProgress, progressive's sampling speed):
# their values (and ReportProgress's steps, through its 60-s timer) differ between any two runs
TIMING_TAGS = ("steps_per_sec", "uptime", "summary/ms_per_sample")

TINY = {"model.channels": 8, "model.channel_mult": (1, 2), "model.num_res_blocks": 1,
        "model.attention_resolutions": (4,), "model.norm_groups": 4, "data.batch_size": 16,
        "eval.num_samples": 64, "eval.batch_size": 64, "eval.final_num_samples": 0,
        "eval.steps_during_training": (2,), "eval.final_steps": (2,),
        "train.num_steps": 40, "train.log_every": 5, "train.save_every": 5, "train.eval_every": 10}


def overrides(method: str, shared: str, num_steps: int = 40) -> dict:
  """The tiny config of `method` as {field: value}; teachers and caches live in `shared`."""
  values = dict(TINY, **{"train.num_steps": num_steps})
  teacher = os.path.join(shared, "teacher.msgpack")
  if method == "progressive":          # two stages (4 -> 2 -> 1 steps): a stage boundary to cross
    values.update({"teacher.checkpoint": teacher, "teacher.sampling_steps": 4,
                   "progressive.steps": "4,2,1", "progressive.steps_per_stage": num_steps // 2,
                   "progressive.stage_overrides": "", "progressive.eval_every": 10,
                   "progressive.validation_examples": 32})
  if method in ("dmd2", "tdm"):
    values.update({"teacher.checkpoint": teacher, "teacher.sampling_steps": 4,
                   "dmd.critic_updates_per_generator": 2, "dmd.regression_pairs": 64,
                   "dmd.regression_steps": 4, "dmd.eval_steps": (1,) if method == "dmd2" else (4,)})
  if method == "multi_teacher":
    values.update({f"multi_teacher.teachers.{i}.checkpoint": os.path.join(shared, f"{i}.msgpack")
                   for i in ("base", "s1", "s2")})
    values.update({"multi_teacher.evaluate_teachers": False, "teacher.sampling_steps": 4,
                   "cache.dir": os.path.join(shared, "cache"), "cache.noise_draws": 2,
                   "cache.records_per_shard": 256, "cache.build_batch_size": 256})
  return values


def flag_value(value) -> str:
  if isinstance(value, tuple):
    return "(" + ",".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def command(method: str, workdir: str, shared: str, num_steps: int = 40) -> list:
  """The `python -m jdistill.main` command line of the method's tiny run."""
  return [sys.executable, "-m", "jdistill.main", f"--config=configs/{CONFIG_FILES[method]}.py",
          f"--workdir={workdir}"] + [f"--config.{k}={flag_value(v)}"
                                     for k, v in overrides(method, shared, num_steps).items()]


def make_config(method: str, shared: str, num_steps: int = 40):
  """The same config in this process (what the cache builds need)."""
  from jdistill import methods
  module = methods.get("dmd" if method in ("dmd2", "tdm") else method)
  config = (module.get_config("digits", method) if method in ("dmd2", "tdm")
            else module.get_config("digits"))
  config.update_from_flattened_dict(overrides(method, shared, num_steps))
  return config


def prepare(method: str, shared: str, num_steps: int = 40):
  """Tiny random teachers (tests/conftest.py's) and, for multi-teacher, the caches, in `shared`."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  from conftest import tiny_teacher_params
  from flax import serialization
  os.makedirs(shared, exist_ok=True)
  if method == "teacher":
    return
  config = make_config(method, shared, num_steps)
  if method != "multi_teacher":
    with open(os.path.join(shared, "teacher.msgpack"), "wb") as f:
      f.write(serialization.to_bytes(tiny_teacher_params(config, 0)))
    return
  from jdistill.methods import multi_teacher
  for k, teacher_id in enumerate(sorted(config.multi_teacher.teachers)):
    with open(config.multi_teacher.teachers[teacher_id].checkpoint, "wb") as f:
      f.write(serialization.to_bytes(tiny_teacher_params(config, k)))
  multi_teacher.build_latents_cache(config, shared)
  for teacher_id in config.multi_teacher.teachers:
    multi_teacher.build_teacher_cache(config, shared, teacher_id)


def environment(cache: str):
  """The runs' environment with a persistent compilation cache in `cache` (runs load the train
  step the first unbroken run compiled, instead of minutes of compiling per restart)."""
  return dict(ENV, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


# The first line every invocation logs after its imports (jdistill.main: "jdistill <method> on 1
# cpu device(s), 1 process(es)"): kill times count from it, so they fall on the run, not on
# importing Python
MARKER = " process(es)"


def launch(cmd, workdir, log_path, cache, kill_after=None, eval_every=1, timeout=1800):
  """Runs `cmd` (log appended to `log_path`), SIGKILLed `kill_after` seconds after it logs MARKER
  unless it finishes first. Returns {finished, seconds (MARKER to the end), and for a kill:
  phase, during_save, during_eval}."""
  with open(log_path, "a") as log:
    offset = log.tell()
    process = subprocess.Popen(cmd, env=environment(cache), cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
  start, marked, left_over = time.time(), None, set(orbax_tmp_dirs(workdir))
  while process.poll() is None:
    if marked is None:
      with open(log_path) as log:
        log.seek(offset)
        marked = time.time() if MARKER in log.read() else None
    if kill_after is not None and marked is not None and time.time() - marked >= kill_after:
      saving = set(orbax_tmp_dirs(workdir))
      process.send_signal(signal.SIGKILL)
      process.wait()
      saving = (saving | set(orbax_tmp_dirs(workdir))) - left_over
      with open(log_path) as log:
        log.seek(offset)
        phase = kill_phase(log.read(), eval_every)
      return dict(finished=False, seconds=round(kill_after, 2), phase=phase,
                  during_save=bool(saving), during_eval=phase == "eval")
    if time.time() - start > timeout:
      process.kill()
      raise RuntimeError(f"{' '.join(cmd)} ran over {timeout} s; log: {log_path}")
    time.sleep(0.02)
  if process.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {process.returncode}); log: {log_path}")
  return dict(finished=True, seconds=time.time() - (marked or start))


def orbax_tmp_dirs(workdir):
  """Orbax's in-progress save directories (a save under way, or one a kill interrupted)."""
  return [p for p in glob.glob(os.path.join(workdir, "**", "*"), recursive=True)
          if "orbax-checkpoint-tmp" in os.path.basename(p)]


def kill_phase(log_text: str, eval_every: int) -> str:
  """Where an invocation's log stops: 'startup' (no train step logged), 'eval' (a step was logged
  whose evaluation had not logged its result), or 'train'."""
  events = [(m.start(), kind, int(m.group(1)), m.group(2))
            for kind, pattern in (("step", r"step (\d+)/(\d+)"), ("eval", r"eval at step (\d+)()"))
            for m in re.finditer(pattern, log_text)]
  if not any(kind == "step" for _, kind, _, _ in events):
    return "startup"
  _, kind, step, total = max(events)
  if kind == "step" and (step % eval_every == 0 or step == int(total)):
    return "eval"
  return "train"


# ----------------------------------------------------------------------------- comparison

def checkpoint_dirs(workdir):
  """Relative paths of the Orbax checkpoint directories of a run (checkpoints/, best/, per stage)."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
    if os.path.isdir(path) and os.path.basename(path) in ("checkpoints", "best"):
      found.append(os.path.relpath(path, workdir))
  return found


def restore(directory, step):
  """(flat {path: numpy array}, meta) of one checkpoint step, without a target state."""
  import jax
  import orbax.checkpoint as ocp
  from jdistill.train import checkpoint as ckpt_lib
  manager = ckpt_lib.manager(directory, asynchronous=False)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           meta=ocp.args.JsonRestore()))
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(jax.device_get(restored["state"]))}
  return flat, restored["meta"]


def steps_of(directory):
  from jdistill.train import checkpoint as ckpt_lib
  return sorted(ckpt_lib.manager(directory, asynchronous=False).all_steps())


def unreadable_checkpoints(workdir):
  """'dir/step: error' for every checkpoint step left in the run that does not restore."""
  bad = []
  for relative in checkpoint_dirs(workdir):
    directory = os.path.join(workdir, relative)
    for step in steps_of(directory):
      try:
        restore(directory, step)
      except Exception as e:  # noqa: BLE001 - any failure to restore is what is counted
        bad.append(f"{relative}/{step}: {type(e).__name__}: {str(e)[:200]}")
  return bad


def same_arrays(a: dict, b: dict) -> list:
  """The paths whose arrays differ in dtype, shape or any bit (or exist in one only)."""
  differ = sorted(set(a) ^ set(b))
  for path in sorted(set(a) & set(b)):
    x, y = a[path], b[path]
    if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
      differ.append(path)
  return differ


def tensorboard_events(workdir) -> dict:
  """{tag: [(step, value bytes)]} of every tensor summary (scalars, images) as TensorBoard shows
  it: its (plugin) EventAccumulator with purge_orphaned_data, so a SessionLog START drops earlier
  events of the steps it restarts. Timing tags left out."""
  from tensorboard.backend.event_processing import plugin_event_accumulator as event_accumulator
  from tensorboard.util import tensor_util
  accumulator = event_accumulator.EventAccumulator(
      workdir, size_guidance=event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE,
      purge_orphaned_data=True)
  accumulator.Reload()
  events = {}
  for tag in accumulator.Tags()["tensors"]:
    if tag in TIMING_TAGS:
      continue
    events[tag] = [(e.step, _value_bytes(tensor_util.make_ndarray(e.tensor_proto)))
                   for e in accumulator.Tensors(tag)]
  return events


def _value_bytes(array):
  if array.dtype == object:
    return b"|".join(bytes(v) for v in array.ravel())
  return array.dtype.str.encode() + array.tobytes()


def tensorboard_differences(unbroken: dict, killed: dict) -> list:
  problems = []
  for tag in sorted(set(unbroken) | set(killed)):
    a, b = unbroken.get(tag, []), killed.get(tag, [])
    for name, events in (("unbroken", a), ("killed", b)):
      steps = [s for s, _ in events]
      if len(steps) != len(set(steps)):
        problems.append(f"tensorboard {tag}: {name} run has duplicated steps "
                        f"{sorted({s for s in steps if steps.count(s) > 1})}")
    if dict(a) != dict(b):
      missing = sorted(set(dict(a)) - set(dict(b)))
      extra = sorted(set(dict(b)) - set(dict(a)))
      changed = sorted(s for s in set(dict(a)) & set(dict(b)) if dict(a)[s] != dict(b)[s])
      problems.append(f"tensorboard {tag}: missing steps {missing}, extra {extra}, values differ "
                      f"at {changed}")
  return problems


def summary_fds(workdir) -> list:
  """The FD numbers of summary.md: table cells under an 'FD' header and 'FD <number>' in text."""
  path = os.path.join(workdir, "summary.md")
  if not os.path.exists(path):
    return None
  numbers, header = [], None
  for line in open(path).read().splitlines():
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if header is None:
        header = cells
      elif not set(line) <= set("|-"):
        numbers += [(h, c) for h, c in zip(header, cells) if "FD" in h]
    else:
      header = None
      numbers += [("text", m) for m in re.findall(r"\bFD (\d[\d.e+-]*)", line)]
  return numbers


def exported_files(workdir) -> dict:
  """{relative path: bytes} of the exported models (*.msgpack and their JSON)."""
  found = {}
  for path in glob.glob(os.path.join(workdir, "**", "*.msgpack"), recursive=True):
    for file in (path, path.replace(".msgpack", ".json")):
      if os.path.exists(file):
        found[os.path.relpath(file, workdir)] = open(file, "rb").read()
  return found


def compare(unbroken: str, killed: str) -> list:
  """Every difference between two finished runs (empty: bit for bit the same ending)."""
  problems = []
  dirs = checkpoint_dirs(unbroken)
  if dirs != checkpoint_dirs(killed):
    problems.append(f"checkpoint directories {dirs} vs {checkpoint_dirs(killed)}")
  for relative in dirs:
    a_dir, b_dir = os.path.join(unbroken, relative), os.path.join(killed, relative)
    if not os.path.isdir(b_dir):
      continue
    a_steps, b_steps = steps_of(a_dir), steps_of(b_dir)
    if not a_steps or not b_steps or a_steps[-1] != b_steps[-1]:
      problems.append(f"{relative}: latest step {a_steps[-1:]} vs {b_steps[-1:]}")
      continue
    (a, a_meta), (b, b_meta) = restore(a_dir, a_steps[-1]), restore(b_dir, b_steps[-1])
    differ = same_arrays(a, b)
    if differ:
      problems.append(f"{relative}/{a_steps[-1]}: {len(differ)} of {len(a)} arrays differ: "
                      f"{differ[:5]}")
    if a_meta != b_meta:
      keys = sorted(k for k in set(a_meta) | set(b_meta) if a_meta.get(k) != b_meta.get(k))
      problems.append(f"{relative}/{a_steps[-1]}: metadata differs in {keys}")
  if summary_fds(unbroken) != summary_fds(killed):
    problems.append(f"summary.md FD: {summary_fds(unbroken)} vs {summary_fds(killed)}")
  a_files, b_files = exported_files(unbroken), exported_files(killed)
  if a_files.keys() != b_files.keys():
    problems.append(f"exported files {sorted(a_files)} vs {sorted(b_files)}")
  problems += [f"exported {name} differs" for name in sorted(set(a_files) & set(b_files))
               if a_files[name] != b_files[name]]
  problems += tensorboard_differences(tensorboard_events(unbroken), tensorboard_events(killed))
  return problems


# ----------------------------------------------------------------------------- the experiment

def run_method(method: str, kills: int, seed: int, root: str, num_steps: int = 40,
               keep: bool = False, repeat_unbroken: bool = True, log=print) -> dict:
  """Two unbroken runs (the first fills the compilation cache and must match the second, whose
  wall time bounds the kill times, as does any faster run that ended unkilled; one with
  `repeat_unbroken` False), then killed runs until `kills` kills landed; the counts and every
  problem."""
  shared = os.path.join(root, method, "shared")
  prepare(method, shared, num_steps)
  eval_every = overrides(method, shared, num_steps).get("progressive.eval_every",
                                                         TINY["train.eval_every"])
  first, unbroken = os.path.join(root, method, "unbroken0"), os.path.join(root, method, "unbroken")
  cache = os.path.join(root, "jax_cache")
  problems = []
  if repeat_unbroken:
    launch(command(method, first, shared, num_steps), first, first + ".log", cache)
  seconds = launch(command(method, unbroken, shared, num_steps), unbroken, unbroken + ".log",
                   cache)["seconds"]
  log(f"{method}: unbroken run {seconds:.0f} s after its imports")
  if repeat_unbroken:
    problems += [f"unbroken runs differ: {p}" for p in compare(first, unbroken)]
  problems += unreadable_checkpoints(unbroken)
  rng = np.random.default_rng(seed)
  record = dict(method=method, seed=seed, unbroken_seconds=round(seconds, 1), runs=0, kills=0,
                kills_during_save=0, kills_during_eval=0, bitwise_equal_endings=0,
                corrupt_checkpoints=0, kill_log=[], problems=problems)
  while record["kills"] < kills:
    workdir = os.path.join(root, method, f"killed{record['runs']}")
    cmd = command(method, workdir, shared, num_steps)
    invocation_kills = []
    while True:
      kill_after = rng.uniform(0, seconds) if record["kills"] < kills else None
      outcome = launch(cmd, workdir, workdir + ".log", cache, kill_after, eval_every)
      if outcome["finished"]:
        if not invocation_kills:        # a whole run, faster than the first (compiling) one
          seconds = min(seconds, outcome["seconds"])
        break
      record["kills"] += 1
      record["kills_during_save"] += outcome["during_save"]
      record["kills_during_eval"] += outcome["during_eval"]
      invocation_kills.append(outcome)
      log(f"{method} run {record['runs']}: kill {record['kills']} at {outcome['seconds']:.1f} s "
          f"({outcome['phase']}{', during a save' if outcome['during_save'] else ''})")
    bad = unreadable_checkpoints(workdir)
    differences = compare(unbroken, workdir)
    record["runs"] += 1
    record["corrupt_checkpoints"] += len(bad)
    record["bitwise_equal_endings"] += not differences
    record["kill_log"].append(dict(run=record["runs"], kills=invocation_kills,
                                   equal=not differences))
    record["problems"] += [f"run {record['runs']}: {p}" for p in bad + differences]
    log(f"{method} run {record['runs']}: {len(invocation_kills)} kills, "
        f"{'bitwise equal' if not differences else 'DIFFERENT: ' + '; '.join(differences)}, "
        f"{len(bad)} unreadable checkpoints")
    if not differences and not bad and not keep:
      shutil.rmtree(workdir, ignore_errors=True)
  return record


HEADER = ("method", "runs", "kills", "kills during saves", "kills during evaluations",
          "bitwise-equal endings", "corrupt checkpoints")


def table(records) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in records:
    lines.append(f"| {r['method']} | {r['runs']} | {r['kills']} | {r['kills_during_save']} | "
                 f"{r['kills_during_eval']} | {r['bitwise_equal_endings']} of {r['runs']} | "
                 f"{r['corrupt_checkpoints']} |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated, from {', '.join(METHODS)}")
  parser.add_argument("--kills", type=int, default=20, help="kills per method")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_steps", type=int, default=40, help="train steps of each tiny run")
  parser.add_argument("--root", default="", help="run directories (default: a temporary one)")
  parser.add_argument("--keep", action="store_true", help="keep equal runs' directories")
  parser.add_argument("--name", default="", help="results file name (default kill_resume_<backend>)")
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
  root = args.root or tempfile.mkdtemp(prefix="kill_resume_")
  import jax
  name = args.name or f"kill_resume_{jax.default_backend()}"
  records = []
  started = time.time()
  for k, method in enumerate(methods):
    records.append(run_method(method, args.kills, args.seed + k, root, args.num_steps, args.keep,
                              log=lambda text: print(text, flush=True)))
    result = dict(command=" ".join(["python", "benchmarks/kill_resume.py"] + (argv or sys.argv[1:])),
                  backend=jax.default_backend(), seconds=round(time.time() - started),
                  num_steps=args.num_steps, records=records)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
      json.dump(result, f, indent=1)
  print(table(records))
  for r in records:
    for problem in r["problems"]:
      print(f"{r['method']}: {problem}")
  return 0 if all(not r["problems"] for r in records) else 1


if __name__ == "__main__":
  sys.exit(main())
