"""Progressive distillation's driver (`configs/progressive.py`; the math: objectives/progressive.py):
the step schedule (strict halving, or a list such as 25,13,7,4,2,1 whose grids nest) and the
stage loop. Each
stage trains a student from its teacher through the one loop with one compiled step (the stage's
step counts are traced), keeps its best checkpoint, exports its student, and adds a row to the
end-of-run table (FD of the student and of DDIM with the teacher at the same steps, speed)."""
from __future__ import annotations

import io
import json
import math
import os
import time

import jax
import ml_collections
from absl import logging

from jdistill import config as config_lib
from jdistill import curriculum as curriculum_lib
from jdistill import files
from jdistill.data import pipeline
from jdistill.errors import ConfigError, check_choice
from jdistill.eval.evaluate import image_grid, save_png
from jdistill.methods import common
from jdistill.models.lora import make_lora
from jdistill.objectives.progressive import (FeatureDistillation, ProgressiveFrozen,
                                             ProgressiveObjective, halving_chain, make_stage,
                                             nested_grids)
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"lora", "curriculum", "features"})   # optional controls (methods/common.py)
EXPORT = "student.msgpack"               # the last stage's student (each stage: its own)
PARAMS_KEY = "ema_params"


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Defaults of progressive distillation (configs/progressive.py, configs/curriculum.py)."""
  config = config_lib.base_config(preset)
  preset = config_lib.data_preset(config.preset)    # `digits_flow` is sized like `digits`
  config.method = "progressive"
  config.progressive = ml_collections.ConfigDict(dict(
      steps="",               # "" = strict halving from teacher.sampling_steps to 1; or "25,13,7,4,2,1"
                              # (each count ceil(previous / 2); direct: any counts of that chain)
      two_step=True,          # False: the 'direct' variant (targets from the original teacher)
      loss_weighting="snr_trunc",
      steps_per_stage=500,
      epochs_per_stage=0.0,   # > 0 overrides steps_per_stage
      stage_overrides="",     # e.g. "0:3000,4:4000"
      start_stage=0,
      eval_every=0,           # evaluate mid-stage too (0: only at each stage's end)
      best_metric="fd",       # the 'best' checkpoint of each stage (lower is better)
      validation_examples=500,  # held-out examples for the per-eval validation distillation loss
  ))
  config.train.save_every = 250
  config.train.log_every = 50
  config.optim.update(lr=5e-4, warmup_steps=0, schedule="linear", final_lr_fraction=0.0,
                      ema_decay=0.995)
  if preset == "digits":       # 64 -> 32 -> ... -> 1 in ~15 min on 2 CPU cores; later stages need more
    config.teacher.sampling_steps = 64
    config.data.batch_size = 64
    config.progressive.stage_overrides = "0:300,1:300,2:400,3:600,4:900,5:1400"
  elif preset == "toy2d":
    config.teacher.sampling_steps = 64
    config.progressive.steps_per_stage = 1000
  elif preset in ("cifar10", "imagenet64"):
    # the released configs (google-research diffusion_distillation, cifar_distill.py and
    # imagenet64_distill.py): 8192 (CIFAR) or 1024 (ImageNet) -> 1 step, 50k steps per halving, lr
    # annealed linearly to 0 in each, no EMA, a student without dropout
    config.teacher.sampling_steps = 8192 if preset == "cifar10" else 1024
    config.progressive.steps_per_stage = 50_000
    config.optim.update(lr=5e-5 if preset == "cifar10" else 1e-4, warmup_steps=0,
                        schedule="linear", final_lr_fraction=0.0, ema_decay=0.0, grad_clip=1.0)
    config.model.dropout = 0.0
    config.train.save_every = 5000
    config.train.log_every = 500
    config.progressive.eval_every = 25_000
  return config


BEST_METRICS = ("fd", "val_loss")


def validate(config):
  p = config.progressive
  check_choice("progressive.best_metric", p.best_metric, BEST_METRICS)
  if p.best_metric == "val_loss" and not p.validation_examples:
    raise ConfigError("config.progressive.best_metric='val_loss' needs "
                      "progressive.validation_examples > 0")
  steps = step_schedule(config, config.teacher.sampling_steps)
  stage_train_steps(config, len(steps) - 1, 1)
  if not 0 <= config.progressive.start_stage < len(steps) - 1:
    raise ScheduleError(f"config.progressive.start_stage={config.progressive.start_stage} is "
                        f"outside 0..{len(steps) - 2}")


def sampling_mode(config) -> str:
  return "ddim"


class ScheduleError(ConfigError):
  """An invalid step schedule or stage plan (a config error, raised before any compute)."""


def step_schedule(config, teacher_steps: int):
  """The sequence of sampling-step counts: teacher first, then each stage's student.

  Default: strict halving from the teacher's steps to 1. Explicit: `config.progressive.steps`
  like "25,13,7,4,2,1" (teacher first), whose grids must nest (objectives/progressive.py): each
  count ceil(previous / 2); the direct variant may skip counts of that chain ("64,8,1")."""
  text = str(config.progressive.steps).strip()
  if text:
    try:
      steps = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError as e:
      raise ScheduleError(f"config.progressive.steps: {text!r} is not a list of integers") from e
  else:
    if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
      raise ScheduleError(f"config.teacher.sampling_steps={teacher_steps}: strict halving needs a "
                          "power of two >= 2; give config.progressive.steps explicitly")
    steps = [teacher_steps >> k for k in range(int(math.log2(teacher_steps)) + 1)]
  if len(steps) < 2:
    raise ScheduleError(f"config.progressive.steps: need a teacher and at least one student, got {steps}")
  if any(n < 1 for n in steps):
    raise ScheduleError(f"config.progressive.steps: step counts must be >= 1, got {steps}")
  if any(b >= a for a, b in zip(steps, steps[1:])):
    raise ScheduleError(f"config.progressive.steps: must strictly decrease, got {steps}")
  chain = halving_chain(steps[0])
  for k, (a, b) in enumerate(zip(steps, steps[1:])):
    if config.progressive.two_step and b != -(-a // 2):
      raise ScheduleError(
          f"config.progressive.steps: stage {k} ({a} -> {b} steps) cannot nest: each student step "
          f"spans two of its teacher's steps (one spans a single step where the count is odd), so "
          f"{a} steps distil into {-(-a // 2)}; the chain from {steps[0]} is {chain}")
    if b not in chain:
      raise ScheduleError(
          f"config.progressive.steps: stage {k} ({a} -> {b} steps) cannot nest: the direct "
          f"variant's students sit on grids of the halving chain from {steps[0]}, {chain}")
  return steps


def stage_train_steps(config, num_stages: int, train_size: int):
  """Train steps per stage: `steps_per_stage` (or `epochs_per_stage`), with `stage_overrides`
  like "0:3000,4:4000"."""
  p = config.progressive
  if p.epochs_per_stage > 0:
    base = max(1, int(round(p.epochs_per_stage * train_size / config.data.batch_size)))
  else:
    base = p.steps_per_stage
  result = [base] * num_stages
  for item in filter(None, str(p.stage_overrides).replace(" ", "").split(",")):
    try:
      index, value = (int(v) for v in item.split(":"))
    except ValueError as e:
      raise ScheduleError(f"config.progressive.stage_overrides: {item!r} is not 'stage:steps'") from e
    if not 0 <= index < num_stages or value < 1:
      raise ScheduleError(f"config.progressive.stage_overrides: {item!r} names stage {index} of "
                          f"{num_stages} or a non-positive step count (the digits preset sets "
                          "overrides for its 6-stage schedule; clear them with "
                          "--config.progressive.stage_overrides=)")
    result[index] = value
  if any(n < 1 for n in result):
    raise ScheduleError("config.progressive.steps_per_stage must be >= 1")
  return result


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  original_teacher = teachers.load_teacher(exp)
  steps = step_schedule(config, config.teacher.sampling_steps)
  exp.evaluator.set_teacher(original_teacher, steps[0])
  teacher_result = exp.evaluator.evaluate(original_teacher, steps[0], final=True)[0]
  teacher_fd = teacher_result["fd"]
  teacher_ms = exp.evaluator.speed(teacher_result, original_teacher, steps[0])
  logging.info("Original teacher: %d DDIM steps, FD %.4g, %.3f ms/sample", steps[0], teacher_fd, teacher_ms)
  rows = [dict(stage="teacher", steps=steps[0], student_fd=teacher_fd, ddim_fd=teacher_fd,
               ms_per_sample=teacher_ms, speedup=1.0, **other_metrics(teacher_result))]
  on_stage = lambda directory, k, n, student, last_eval, grid: rows.append(stage_row(
      exp, directory, k, n, student, original_teacher, teacher_ms, last_eval, grid))
  students = run_stages(exp, make_objective(exp), steps, original_teacher, on_stage)
  write_summary(workdir, rows, time.time() - run_start, steps, exp)
  return students[steps[-1]]


def run_stages(exp, objective, steps, original_teacher, on_stage=None, guidance: float = 0.0):
  """The stage loop of schedule `steps` from `original_teacher` (the stage-1 student of guided
  distillation): each stage trains its student through the one compiled step, keeps its best
  checkpoint, exports it, and calls `on_stage(directory, k, n_student, student, last_eval, grid)`.
  `guidance`: the w that evaluations tell a guidance-conditioned student. Returns {N: the N-step
  student} of the stages run."""
  config, workdir, p = exp.config, exp.workdir, exp.config.progressive
  num_stages = len(steps) - 1
  grids = nested_grids(steps)
  train_steps = stage_train_steps(config, num_stages, len(exp.train_source.records))
  logging.info("Progressive schedule %s (%s), train steps per stage %s",
               " -> ".join(map(str, steps)), "two-step" if p.two_step else "direct", train_steps)
  guided = bool(objective.guidance_range)
  param_shardings = exp.param_shardings(guided)
  frozen_shardings = ProgressiveFrozen(
      teacher=param_shardings, student_base=param_shardings if objective.lora is not None else None)
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings=frozen_shardings)
  make_state = common.state_maker(objective, compiled)
  validation_batch = (pipeline.all_examples(exp.test_source, p.validation_examples)
                      if p.validation_examples else None)
  validation_loss = jax.jit(objective.validation_loss)

  teacher, students, adapters = original_teacher, {}, None
  if p.start_stage > 0 and not config.teacher.checkpoint:
    previous = stage_dir(workdir, p.start_stage - 1, steps[p.start_stage])
    teacher = ckpt_lib.restore_params(os.path.join(previous, "checkpoints"),
                                      exp.abstract_params(guided=guided))
  offset = sum(train_steps[:p.start_stage])
  for k in range(p.start_stage, num_stages):
    n_teacher, n_student = steps[k], steps[k + 1]
    directory = stage_dir(workdir, k, n_student)
    stage = make_stage(grids, k, train_steps[k], p.two_step)
    grid = grid_times(grids, k + 1)
    frozen = ProgressiveFrozen(teacher=teacher if p.two_step else original_teacher,
                               student_base=teacher if objective.lora is not None else None)
    last_eval = {}

    def evaluate(params, step, n_student=n_student, k=k, last_eval=last_eval, frozen=frozen,
                 stage=stage, grid=grid):
      result, samples = exp.evaluator.evaluate(params, n_student, grid=grid, guidance=guidance)
      last_eval.update(result=result, samples=samples)
      scalars = dict(result)
      if p.validation_examples:
        scalars["val_loss"] = float(validation_loss(params, frozen.teacher, validation_batch,
                                                    jax.random.key(k), stage))
      logging.info("stage %d (%d steps) eval at step %d: %s", k, n_student, step,
                   "  ".join(f"{key}={v:.4g}" for key, v in scalars.items()))
      return scalars, {"samples": image_grid(samples)[None]}

    logging.info("Stage %d/%d: %d -> %d steps, %d train steps -> %s", k + 1, num_stages, n_teacher,
                 n_student, train_steps[k], directory)
    settings = loop.Settings.from_config(config, num_steps=train_steps[k], seed=config.seed + k,
                                         eval_every=p.eval_every)
    trained = common.train(
        exp, objective, settings, workdir=directory, train_data=exp.train_data(seed_offset=k),
        evaluate=evaluate, best_metric=p.best_metric, compiled=compiled, frozen=frozen, stage=stage,
        initial_state=lambda teacher=teacher: make_state(teacher),
        metric_prefix=f"stage{k}_{n_student}steps/", global_step_offset=offset,
        meta={"stage": k, "student_steps": n_student, "teacher_steps": n_teacher})
    offset += train_steps[k]
    student = objective.eval_params(trained.state, frozen)
    adapters = common.adapters(objective, trained.state, f"the {n_teacher}-step teacher of "
                               "this stage" + (" (the run's teacher)" if k == 0 else ""))
    common.export(student, config, os.path.join(directory, EXPORT), "ddim", n_student, grid,
                  guidance, adapters)
    if on_stage is not None:
      on_stage(directory, k, n_student, student, last_eval, grid)
    teacher = students[n_student] = student
  common.export(teacher, config, os.path.join(workdir, EXPORT), "ddim", steps[-1],
                grid_times(grids, num_stages), guidance, adapters)
  return students


def make_objective(exp, guidance_range: tuple = ()):
  """The stage objective; `guidance_range` (w_min, w_max): guided distillation's stage 2."""
  c, p = exp.config, exp.config.progressive
  features = None
  if c.features.weight_start or c.features.weight_end:
    features = FeatureDistillation(tuple(c.features.layers), c.features.weight_start,
                                   c.features.weight_end, c.features.schedule)
  return ProgressiveObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim, exp.data_shape,
                              p.loss_weighting, min_snr_gamma=c.diffusion.min_snr_gamma,
                              curriculum=curriculum_lib.make_scheduler(c),
                              features=features, lora=make_lora(c), guidance_range=guidance_range)


def stage_dir(workdir, k, n_student):
  return os.path.join(workdir, "stages", f"{k}_{n_student}steps")


def grid_times(grids, k):
  """The sampling grid of count k of the schedule (times in [0, 1]; k = 0: the original teacher)."""
  return [i / grids[0][-1] for i in grids[k]]


def stage_row(exp, directory, k, n_student, student, original_teacher, teacher_ms, last_eval,
              grid=None):
  """Stage results (cached in <stage>/result.json so a resumed run does not recompute them, unless
  the run now evaluates differently); `last_eval` holds the loop's end-of-stage evaluation of
  `student` (on its `grid`) unless the stage was already trained before this invocation."""
  path = os.path.join(directory, "result.json")
  evaluated_with = json.loads(exp.config.eval.to_json())
  cached = files.read_json(path)
  if cached is not None and cached.get("evaluated_with") == evaluated_with:
    return cached
  if not last_eval or not exp.evaluator.final_reuses_training_count:
    result, samples = exp.evaluator.evaluate(student, n_student, final=True, grid=grid)
    last_eval = dict(result=result, samples=samples)
  student_fd, student_samples = last_eval["result"]["fd"], last_eval["samples"]
  ddim_result, ddim_samples = exp.evaluator.evaluate(original_teacher, n_student, final=True)
  save_png(image_grid(student_samples), os.path.join(directory, "student_samples.png"))
  save_png(image_grid(ddim_samples), os.path.join(directory, "ddim_teacher_samples.png"))
  ms = exp.evaluator.speed(last_eval["result"], student, n_student)
  row = dict(stage=k, steps=n_student, student_fd=float(student_fd), ddim_fd=ddim_result["fd"],
             ms_per_sample=ms, speedup=teacher_ms / ms, evaluated_with=evaluated_with, grid=grid,
             **other_metrics(last_eval["result"]))
  exp.writer.write_scalars(k, {"summary/student_fd": row["student_fd"],
                               "summary/ddim_teacher_fd": row["ddim_fd"],
                               "summary/ms_per_sample": ms})
  logging.info("Stage %d done: %d steps, student FD %.4g, DDIM teacher FD %.4g, %.3f ms/sample "
               "(%.1fx faster than the teacher)", k, n_student, row["student_fd"], row["ddim_fd"], ms,
               row["speedup"])
  files.write_json(path, row)
  return row


def other_metrics(result) -> dict:
  """The student FD's companions in a stage row: FD (teacher), memorised, precision, recall."""
  return {k: float(result[k]) for k in common.METRIC_KEYS[1:] if k in result}


def write_summary(workdir, rows, seconds, steps, exp):
  common.write_summary(
      workdir, f"Progressive distillation: {exp.config.preset}",
      [f"schedule {' -> '.join(map(str, steps))}, wall time {seconds / 60:.1f} min "
       f"(this invocation), FD on {exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["stage", "steps", *common.METRIC_HEADER, "DDIM teacher FD (same steps)", "ms / sample",
       "speedup"],
      [[r["stage"], r["steps"], *common.metric_cells(dict(r, fd=r["student_fd"])),
        f"{r['ddim_fd']:.4g}", f"{r['ms_per_sample']:.3f}", f"{r['speedup']:.1f}x"] for r in rows],
      common.floor_lines(exp))
  if jax.process_index() == 0:
    plot_fd_vs_steps(rows, os.path.join(workdir, "fd_vs_steps.png"))


def plot_fd_vs_steps(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = [r for r in rows if r["stage"] != "teacher"]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r["steps"] for r in stages], [r["student_fd"] for r in stages], "o-", label="distilled")
  ax.plot([r["steps"] for r in stages], [r["ddim_fd"] for r in stages], "s--", label="DDIM (teacher)")
  ax.axhline(rows[0]["student_fd"], color="gray", lw=0.8, label=f"teacher, {rows[0]['steps']} steps")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sampling steps")
  ax.set_ylabel("FD")
  ax.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  files.write_bytes(path, buffer.getvalue())
