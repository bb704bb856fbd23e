"""Guided distillation's driver (`configs/guided.py`; Meng et al., CVPR 2023). Stage 1
(objectives/guided.py) distils a class-conditional teacher's two-pass classifier-free guidance into
one guidance-conditioned student, w ~ U[w_min, w_max] per example; stage 2 halves its steps by
progressive distillation (methods/progressive.py `run_stages`), every target at the example's w.
One student serves every w, in one pass per step.

The summary gives, at each w of `guided.eval_guidance`: FD, FD to the CFG teacher at that w and
the class accuracy (digits classifier) of the CFG teacher (two passes per step) and the stage-1
student at `guided.eval_steps`, and of the stage-2 students at `guided.stage2_eval_steps`, with
ms per sample."""
from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from jdistill import config as config_lib
from jdistill.config import check
from jdistill.methods import common, progressive
from jdistill.objectives.guided import GuidedFrozen, GuidedObjective
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset()
EXPORT = "student.msgpack"        # the last stage-2 student (stage 1's: stages/guided/)
PARAMS_KEY = "ema_params"
STAGE1_DIR = os.path.join("stages", "guided")


def get_config(preset: str = "digits_cond") -> ml_collections.ConfigDict:
  """Stage 2 is configured by the `progressive` section (its digits schedule 64 -> ... -> 1)."""
  config = progressive.get_config(preset)
  config.method = "guided"
  config.guided = ml_collections.ConfigDict(dict(
      guidance_min=0.0,           # w ~ U[w_min, w_max] per example (the paper's ImageNet-64: [0, 4])
      guidance_max=4.0,
      train_steps=2000,           # stage 1
      guidance=2.0,               # the w of evaluations during training (best checkpoints) and of
                                  # the exported students' default sampling
      eval_guidance=(0.0, 1.0, 2.0, 4.0),   # the summary's w
      eval_steps=(64, 4),         # the CFG teacher's and the stage-1 student's rows
      stage2_eval_steps=(4, 2, 1),  # the stage-2 students' rows (counts of the schedule)
  ))
  return config


def validate(config):
  g = config.guided
  progressive.validate(config)
  check(config.model.num_classes > 0, "model.num_classes",
        "guided distillation needs a class-conditional teacher (e.g. preset digits_cond)")
  check(config.diffusion.label_dropout > 0, "diffusion.label_dropout",
        "the teacher must have learned the null class that CFG guides with (label_dropout > 0)")
  check(0.0 <= g.guidance_min < g.guidance_max, "guided.guidance_max",
        f"need 0 <= guidance_min < guidance_max, got [{g.guidance_min}, {g.guidance_max}]")
  check(g.train_steps >= 1, "guided.train_steps", f"must be >= 1, got {g.train_steps}")
  check(len(g.eval_guidance) > 0 and min(g.eval_guidance) >= 0, "guided.eval_guidance",
        f"need one or more w >= 0, got {tuple(g.eval_guidance)}")
  config_lib.check_step_counts("guided.eval_steps", g.eval_steps)
  steps = progressive.step_schedule(config, config.teacher.sampling_steps)
  config_lib.check_step_counts("guided.stage2_eval_steps", g.stage2_eval_steps)
  missing = [n for n in g.stage2_eval_steps if n not in steps[1:]]
  check(not missing, "guided.stage2_eval_steps",
        f"{missing} are not students of the stage-2 schedule {steps}")


def sampling_mode(config) -> str:
  return "ddim"


def make_objective(exp):
  c, g = exp.config, exp.config.guided
  return GuidedObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim, g.train_steps,
                         exp.data_shape, guidance_range=(g.guidance_min, g.guidance_max),
                         weighting=c.diffusion.loss_weighting,
                         min_snr_gamma=c.diffusion.min_snr_gamma)


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  g = config.guided
  teacher = teachers.load_teacher(exp)
  steps = progressive.step_schedule(config, config.teacher.sampling_steps)
  exp.evaluator.set_teacher(teacher, steps[0], guidance=g.guidance)

  objective = make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh,
                               frozen_shardings=GuidedFrozen(teacher=exp.param_shardings()))
  make_state = common.state_maker(objective, compiled)
  directory = os.path.join(workdir, STAGE1_DIR)
  logging.info("Guided distillation, stage 1: w ~ U[%g, %g], %d train steps -> %s",
               g.guidance_min, g.guidance_max, g.train_steps, directory)
  trained = common.train(
      exp, objective, loop.Settings.from_config(config, num_steps=g.train_steps,
                                                eval_every=config.progressive.eval_every),
      workdir=directory, train_data=exp.train_data(seed_offset=100),
      evaluate=common.fd_callback(exp, [steps[0]], "guided student: ", guidance=g.guidance),
      best_metric=f"fd_{steps[0]}steps", compiled=compiled, frozen=GuidedFrozen(teacher=teacher),
      initial_state=lambda: make_state(teacher), metric_prefix="guided/")
  student = objective.eval_params(trained.state)
  common.export(student, config, os.path.join(directory, EXPORT), "ddim", steps[0],
                guidance=g.guidance)

  grids = {}
  students = progressive.run_stages(
      exp, progressive.make_objective(exp, (g.guidance_min, g.guidance_max)), steps, student,
      lambda directory, k, n, params, last_eval, grid: (n, grid), lambda row: grids.update([row]),
      guidance=g.guidance)

  rows = []
  for w in g.eval_guidance:
    exp.evaluator.set_teacher(teacher, steps[0], guidance=w)
    models = ([("CFG teacher (2 passes)", teacher, n) for n in g.eval_steps]
              + [("guided student", student, n) for n in g.eval_steps]
              + [("stage-2 student", students[n], n) for n in g.stage2_eval_steps if n in students])
    for name, params, n in models:
      result, _ = exp.evaluator.evaluate(params, n, final=True, guidance=w,
                                         grid=grids.get(n) if name == "stage-2 student" else None)
      result["ms_per_sample"] = exp.evaluator.speed(result, params, n, guidance=w)
      rows.append((name, n, w, result))
      logging.info("%s, %d steps, w=%g: %s", name, n, w,
                   "  ".join(f"{k}={v:.4g}" for k, v in result.items()))
  write_summary(workdir, rows, time.time() - run_start, steps, exp)
  return students[steps[-1]]


def write_summary(workdir, rows, seconds, steps, exp):
  g = exp.config.guided
  common.write_summary(
      workdir, f"Guided distillation: {exp.config.preset}",
      [f"stage 1: w ~ U[{g.guidance_min:g}, {g.guidance_max:g}], {g.train_steps} train steps; "
       f"stage 2: {' -> '.join(map(str, steps))}; wall time {seconds / 60:.1f} min (this "
       f"invocation); metrics on {exp.evaluator.final_num_samples} samples vs the held-out split, "
       f"FD (teacher) to the {steps[0]}-step CFG teacher at the same w; accuracy: the digits "
       "classifier's agreement with the class asked for"],
      ["model", "steps", "w", *common.METRIC_HEADER, "accuracy", "ms / sample"],
      [[name, n, f"{w:g}", *common.metric_cells(r),
        "" if r.get("accuracy") is None else f"{r['accuracy']:.3f}", f"{r['ms_per_sample']:.3f}"]
       for name, n, w, r in rows],
      common.floor_lines(exp))
