"""Guided distillation's driver (`configs/guided.py`; Meng et al., CVPR 2023). Stage 1
(objectives/guided.py) distils a class-conditional teacher's two-pass classifier-free guidance into
one guidance-conditioned student, w ~ U[w_min, w_max] per example; stage 2 halves its steps by
progressive distillation (methods/progressive.py `run_stages`), every target at the example's w.
One student serves every w, in one pass per step.

The summary gives, at each w of `student_guidance.summary_w`: FD, FD to the CFG teacher at that
w and the class accuracy (digits classifier) of the CFG teacher (two passes per step) and the
stage-1 student at `guided.eval_steps`, and of the stage-2 students at
`guided.stage2_eval_steps`, with ms per sample."""
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

CONTROLS = frozenset({"student_guidance"})   # required: it is the method's w
EXPORT = "student.msgpack"        # the last stage-2 student (stage 1's: stages/guided/)
PARAMS_KEY = "ema_params"
STAGE1_DIR = os.path.join("stages", "guided")


def get_config(preset: str = "digits_cond") -> ml_collections.ConfigDict:
  """Stage 1 is configured by `guided`, stage 2 by the `progressive` section (its digits schedule
  64 -> ... -> 1), the w of both by the shared `student_guidance` section."""
  config = progressive.get_config(preset)
  config.method = "guided"
  config.student_guidance.update(w_min=0.0, w_max=4.0)     # the paper's ImageNet-64 range
  config.guided = ml_collections.ConfigDict(dict(
      train_steps=2000,           # stage 1
      eval_steps=(64, 4),         # the CFG teacher's and the stage-1 student's rows
      stage2_eval_steps=(4, 2, 1),  # the stage-2 students' rows (counts of the schedule)
  ))
  return config


def validate(config):
  g = config.guided
  progressive.validate(config)
  check(bool(config_lib.student_guidance_range(config)), "student_guidance.w_max",
        "guided distillation trains a guidance-conditioned student: set w_max > 0")
  check(g.train_steps >= 1, "guided.train_steps", f"must be >= 1, got {g.train_steps}")
  config_lib.check_step_counts("guided.eval_steps", g.eval_steps)
  steps = progressive.step_schedule(config, config.teacher.sampling_steps)
  config_lib.check_step_counts("guided.stage2_eval_steps", g.stage2_eval_steps)
  missing = [n for n in g.stage2_eval_steps if n not in steps[1:]]
  check(not missing, "guided.stage2_eval_steps",
        f"{missing} are not students of the stage-2 schedule {steps}")


def sampling_mode(config) -> str:
  return "ddim"


def make_objective(exp):
  c = exp.config
  return GuidedObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim, c.guided.train_steps,
                         exp.data_shape, guidance_range=config_lib.student_guidance_range(c),
                         weighting=c.diffusion.loss_weighting,
                         min_snr_gamma=c.diffusion.min_snr_gamma)


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  g, w = config.guided, config.student_guidance
  w_range = config_lib.student_guidance_range(config)
  teacher = teachers.load_teacher(exp)
  steps = progressive.step_schedule(config, config.teacher.sampling_steps)
  exp.evaluator.set_teacher(teacher, steps[0], guidance=w.eval_w)

  objective = make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh,
                               frozen_shardings=GuidedFrozen(teacher=exp.param_shardings()))
  make_state = common.state_maker(objective, compiled)
  directory = os.path.join(workdir, STAGE1_DIR)
  logging.info("Guided distillation, stage 1: w ~ U[%g, %g], %d train steps -> %s", *w_range,
               g.train_steps, directory)
  trained = common.train(
      exp, objective, loop.Settings.from_config(config, num_steps=g.train_steps,
                                                eval_every=config.progressive.eval_every),
      workdir=directory, train_data=exp.train_data(seed_offset=100),
      evaluate=common.fd_callback(exp, [steps[0]], "guided student: ", guidance=w.eval_w),
      best_metric=f"fd_{steps[0]}steps", compiled=compiled, frozen=GuidedFrozen(teacher=teacher),
      initial_state=lambda: make_state(teacher), metric_prefix="guided/")
  student = objective.eval_params(trained.state)
  common.export(student, config, os.path.join(directory, EXPORT), "ddim", steps[0],
                guidance=w.eval_w)

  students = progressive.run_stages(exp, progressive.make_objective(exp, w_range), steps, student,
                                    guidance=w.eval_w)
  grids = progressive.nested_grids(steps)

  models = ([("CFG teacher (2 passes)", teacher, n, "ddim", None) for n in g.eval_steps]
            + [("guided student", student, n, "ddim", None) for n in g.eval_steps]
            + [("stage-2 student", students[n], n, "ddim",
                progressive.grid_times(grids, steps.index(n)))
               for n in g.stage2_eval_steps if n in students])
  rows = common.guidance_rows(exp, teacher, steps[0], models, w.summary_w)
  common.write_guidance_summary(
      exp, f"Guided distillation: {config.preset}",
      f"stage 1: w ~ U[{w_range[0]:g}, {w_range[1]:g}], {g.train_steps} train steps; stage 2: "
      f"{' -> '.join(map(str, steps))}; wall time {(time.time() - run_start) / 60:.1f} min (this "
      "invocation)", rows)
  return students[steps[-1]]
