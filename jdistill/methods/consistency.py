"""Consistency distillation (`configs/consistency.py`): sCD (`consistency.variant='scd'`, Lu & Song
2025) or the classic discrete CD baseline ('cd', Song et al. 2023), both in
objectives/consistency.py. The student starts as the teacher and samples by re-noising: 1 step, and
2 steps through the paper's intermediate noise level; the summary compares it with the teacher."""
from __future__ import annotations

import math
import os
import time

import ml_collections
import numpy as np

from jdistill import config as config_lib
from jdistill.config import check
from jdistill.errors import check_choice
from jdistill.methods import common
from jdistill.objectives.consistency import CDObjective, ConsistencyFrozen, SCDObjective
from jdistill.diffusion.schedules import time_of_logsnr
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"student_guidance"})    # optional controls (methods/common.py)
EXPORT = "student.msgpack"
PARAMS_KEY = "ema_params"
MODE = "renoise"
VARIANTS = ("scd", "cd")


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Presets: the shared ones (`digits`, `toy2d`, each also `_flow`), and `cd` (digits, the
  discrete CD baseline)."""
  variant = "cd" if preset == "cd" else "scd"
  config = config_lib.base_config("digits" if preset == "cd" else preset)
  config.preset = preset
  config.method = "consistency"
  config.consistency = ml_collections.ConfigDict(dict(
      variant=variant,            # 'scd' | 'cd'
      p_mean=-1.0,                # sCD: tan(t) = exp(P_mean + P_std n) / sigma_d
      p_std=1.4,
      tangent_c=0.1,              # sCD: g / (||g|| + c)
      warmup_steps=1000,          # sCD: tangent warm-up r from 0 to 1 over these steps
      num_points=18,              # CD: the Karras grid's N
      sigma_min=0.002,            # CD: its smallest EDM noise level (the boundary)
      sigma_max=0.0,              # CD: its largest; 0: the schedule's at t = 1 (the sampler's start)
      target_decay=0.95,          # CD: the target network's EMA rate mu
      mid_sigma=0.5 * math.tan(1.1),  # 2-step sampling's middle: the paper's t = 1.1, sigma_d = 0.5
      eval_steps=(1, 2),          # sampling steps evaluated
  ))
  config.data.batch_size = 64
  config.optim.update(lr=1e-4, warmup_steps=100, schedule="constant", ema_decay=0.999)
  config.teacher.sampling_steps = 64
  config.train.update(num_steps=3000, log_every=50, save_every=500, eval_every=1000)
  return config


def validate(config):
  c = config.consistency
  check_choice("consistency.variant", c.variant, VARIANTS)
  check(c.p_std > 0, "consistency.p_std", f"must be > 0, got {c.p_std}")
  check(c.tangent_c > 0, "consistency.tangent_c", f"must be > 0, got {c.tangent_c}")
  check(c.warmup_steps >= 0, "consistency.warmup_steps", f"must be >= 0, got {c.warmup_steps}")
  check(c.num_points >= 2, "consistency.num_points", f"must be >= 2, got {c.num_points}")
  check(c.sigma_min > 0, "consistency.sigma_min", f"must be > 0, got {c.sigma_min}")
  check(c.sigma_max == 0 or c.sigma_max > c.sigma_min, "consistency.sigma_max",
        f"must be 0 (the schedule's) or > sigma_min={c.sigma_min}, got {c.sigma_max}")
  check(0.0 <= c.target_decay < 1.0, "consistency.target_decay",
        f"must be in [0, 1), got {c.target_decay}")
  check(c.mid_sigma > 0, "consistency.mid_sigma", f"must be > 0, got {c.mid_sigma}")
  check(len(c.eval_steps) > 0 and all(n in (1, 2) for n in c.eval_steps),
        "consistency.eval_steps", f"must be 1 and/or 2 sampling steps, got {tuple(c.eval_steps)}")


def sampling_mode(config) -> str:
  return MODE


def make_objective(exp):
  c, k = exp.config, exp.config.consistency
  shared = (exp.denoiser, exp.schedule, exp.optimizer(), c.optim, c.train.num_steps, exp.data_shape)
  guidance_range = config_lib.student_guidance_range(c)
  if k.variant == "scd":
    return SCDObjective(*shared, p_mean=k.p_mean, p_std=k.p_std, tangent_c=k.tangent_c,
                        warmup_steps=k.warmup_steps, guidance_range=guidance_range)
  sigma_max = k.sigma_max or math.exp(-0.5 * float(exp.schedule(1.0)))
  return CDObjective(*shared, num_points=k.num_points, sigma_min=k.sigma_min, sigma_max=sigma_max,
                     target_decay=k.target_decay, guidance_range=guidance_range)


def sampling_grids(config, schedule) -> dict:
  """{2: [0, t_mid, 1]}: the 2-step sampler's middle at EDM noise level `mid_sigma`."""
  t_mid = time_of_logsnr(schedule, -2.0 * math.log(config.consistency.mid_sigma))
  return {2: np.array([0.0, t_mid, 1.0])}


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  k = config.consistency
  teacher = teachers.load_teacher(exp)
  # a guidance-conditioned student (student_guidance) learns every w and is told its w: its
  # evaluations and export at eval_w, FD (teacher) to the CFG teacher there
  w_range = config_lib.student_guidance_range(config)
  told = config.student_guidance.eval_w if w_range else 0.0
  exp.evaluator.set_teacher(teacher, config.teacher.sampling_steps, guidance=told)
  objective = make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh,
                               frozen_shardings=ConsistencyFrozen(teacher=exp.param_shardings()))
  make_state = common.state_maker(objective, compiled)
  eval_steps, grids = list(k.eval_steps), sampling_grids(config, exp.schedule)
  trained = common.train(
      exp, objective, loop.Settings.from_config(config), workdir=workdir,
      train_data=exp.train_data(),
      evaluate=common.fd_callback(exp, eval_steps, mode=MODE, grids=grids, guidance=told),
      best_metric=f"fd_{eval_steps[0]}steps", compiled=compiled,
      frozen=ConsistencyFrozen(teacher=teacher), initial_state=lambda: make_state(teacher))
  student = objective.eval_params(trained.state)
  common.export(student, config, os.path.join(workdir, EXPORT), MODE, eval_steps[0],
                grid=grids.get(eval_steps[0]), guidance=told)
  label = {"scd": "sCD", "cd": "CD"}[k.variant]
  if w_range:
    common.write_student_guidance_summary(
        exp, teacher, [(f"{label} student", student, n, MODE, grids.get(n)) for n in eval_steps],
        f"Consistency distillation ({label}), guidance-conditioned: {config.preset}",
        f"{config.train.num_steps} train steps, wall time {(time.time() - run_start) / 60:.1f} "
        "min (this invocation)")
    return student
  rows = common.teacher_rows(exp, teacher, eval_steps)
  rows += [(label, row) for row in common.fd_table(exp, student, eval_steps, mode=MODE,
                                                   last_eval=trained.last_eval, name="student_",
                                                   grids=grids)]
  common.write_summary(
      workdir, f"Consistency distillation ({label}): {config.preset}",
      [f"{config.train.num_steps} train steps ({trained.seconds / 60:.1f} min training, wall time "
       f"{(time.time() - run_start) / 60:.1f} min this invocation); 2-step sampling through EDM "
       f"sigma {k.mid_sigma:.3g} (t = {grids[2][1]:.4f}); metrics on "
       f"{exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["model", "steps", *common.METRIC_HEADER, "ms / sample"],
      [[name, row["steps"], *common.metric_cells(row), f"{row['ms_per_sample']:.3f}"]
       for name, row in rows],
      common.floor_lines(exp))
  return student
