"""MeanFlow (`configs/meanflow.py`): a flow-map student of the teacher (objectives/meanflow.py),
initialised from it with a zero interval embedding, sampled in 1 and 2 flow-map steps
(diffusion/sampling.py 'flowmap'); the summary compares it with the teacher."""
from __future__ import annotations

import os
import time

import ml_collections

from jdistill import config as config_lib
from jdistill.config import check
from jdistill.errors import check_choice
from jdistill.methods import common
from jdistill.objectives.meanflow import VELOCITY_SOURCES, MeanFlowFrozen, MeanFlowObjective
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"student_guidance"})    # optional controls (methods/common.py)
EXPORT = "student.msgpack"
PARAMS_KEY = "ema_params"
MODE = "flowmap"


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  config = config_lib.base_config(preset)
  config.method = "meanflow"
  config.meanflow = ml_collections.ConfigDict(dict(
      velocity_source="teacher",  # v of the identity: the teacher's velocity, or 'data' (e - x)
      time_mean=-0.4,             # (r, t) logit-normal, as the paper's ImageNet runs
      time_std=1.0,
      equal_share=0.75,           # share of r = t (the paper's best: 75%)
      weight_c=1e-3,              # adaptive weighting 1 / (||delta||^2 + c)^p
      weight_p=1.0,
      eval_steps=(1, 2),          # flow-map sampling steps evaluated
  ))
  config.data.batch_size = 64
  config.optim.update(lr=2e-4, warmup_steps=100, schedule="constant", ema_decay=0.999)
  config.teacher.sampling_steps = 64
  config.train.update(num_steps=3000, log_every=50, save_every=500, eval_every=1000)
  return config


def validate(config):
  m = config.meanflow
  check_choice("meanflow.velocity_source", m.velocity_source, VELOCITY_SOURCES)
  check(m.time_std > 0, "meanflow.time_std", f"must be > 0, got {m.time_std}")
  check(0.0 <= m.equal_share <= 1.0, "meanflow.equal_share", f"must be in [0, 1], got {m.equal_share}")
  check(m.weight_c > 0, "meanflow.weight_c", f"must be > 0, got {m.weight_c}")
  check(m.weight_p >= 0, "meanflow.weight_p", f"must be >= 0, got {m.weight_p}")
  config_lib.check_step_counts("meanflow.eval_steps", m.eval_steps)
  check(not config_lib.student_guidance_range(config) or m.velocity_source == "teacher",
        "meanflow.velocity_source", "a guidance-conditioned flow map learns the teacher's CFG "
        "velocity at its w: use 'teacher' with student_guidance")


def sampling_mode(config) -> str:
  return MODE


def make_objective(exp):
  c, m = exp.config, exp.config.meanflow
  return MeanFlowObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim, c.train.num_steps,
                           exp.data_shape, velocity_source=m.velocity_source,
                           time_mean=m.time_mean, time_std=m.time_std, equal_share=m.equal_share,
                           weight_c=m.weight_c, weight_p=m.weight_p,
                           guidance_range=config_lib.student_guidance_range(c))


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  m = config.meanflow
  teacher = teachers.load_teacher(exp)
  # a guidance-conditioned flow map (student_guidance) is evaluated and exported at eval_w
  w_range = config_lib.student_guidance_range(config)
  told = config.student_guidance.eval_w if w_range else 0.0
  exp.evaluator.set_teacher(teacher, config.teacher.sampling_steps, guidance=told)
  objective = make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh,
                               frozen_shardings=MeanFlowFrozen(teacher=exp.param_shardings()))
  make_state = common.state_maker(objective, compiled)
  eval_steps = list(m.eval_steps)
  trained = common.train(
      exp, objective, loop.Settings.from_config(config), workdir=workdir,
      train_data=exp.train_data(),
      evaluate=common.fd_callback(exp, eval_steps, mode=MODE, guidance=told),
      best_metric=f"fd_{eval_steps[0]}steps", compiled=compiled,
      frozen=MeanFlowFrozen(teacher=teacher), initial_state=lambda: make_state(teacher))
  student = objective.eval_params(trained.state)
  common.export(student, config, os.path.join(workdir, EXPORT), MODE, eval_steps[0],
                guidance=told)
  if w_range:
    common.write_student_guidance_summary(
        exp, teacher, [("MeanFlow", student, n, MODE, None) for n in eval_steps],
        f"MeanFlow, guidance-conditioned: {config.preset}",
        f"{config.train.num_steps} train steps, wall time {(time.time() - run_start) / 60:.1f} "
        "min (this invocation)")
    return student
  rows = common.teacher_rows(exp, teacher, eval_steps)
  rows += [("MeanFlow", row) for row in common.fd_table(exp, student, eval_steps, mode=MODE,
                                                        last_eval=trained.last_eval,
                                                        name="student_")]
  common.write_summary(
      workdir, f"MeanFlow: {config.preset}",
      [f"v from the {m.velocity_source}, {config.train.num_steps} train steps "
       f"({trained.seconds / 60:.1f} min training, wall time "
       f"{(time.time() - run_start) / 60:.1f} min this invocation); metrics on "
       f"{exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["model", "steps", *common.METRIC_HEADER, "ms / sample"],
      [[name, row["steps"], *common.metric_cells(row), f"{row['ms_per_sample']:.3f}"]
       for name, row in rows],
      common.floor_lines(exp))
  return student
