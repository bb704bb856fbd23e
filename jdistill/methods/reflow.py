"""Reflow (`configs/reflow.py`): the 2-rectified flow of the teacher on its couplings, then its
one-step distillation (objectives/reflow.py). Each stage computes its couplings first (the
teacher's, then the 2-rectified flow's), trains in `workdir/stages/<k>_<name>`, and exports;
the summary compares both with the teacher at the same step counts."""
from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from jdistill import config as config_lib
from jdistill import partitioning
from jdistill.config import check
from jdistill.diffusion.sampling import teacher_couplings
from jdistill.methods import common
from jdistill.objectives.reflow import ReflowFrozen, ReflowObjective, ReflowStage
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"guidance"})    # the teacher's couplings are guided; students sample without
EXPORT = "student.msgpack"
PARAMS_KEY = "ema_params"
STAGES = ("reflow", "distill")


def get_config(preset: str = "digits_flow") -> ml_collections.ConfigDict:
  config = config_lib.base_config(preset)
  config.method = "reflow"
  config.reflow = ml_collections.ConfigDict(dict(
      couplings=8192,           # (noise, sample) pairs of each stage, from fixed noise
      coupling_steps=32,        # Euler (= DDIM) steps of the ODE that makes each pair
      reflow_steps=2000,        # train steps of the 2-rectified flow
      distill_steps=1000,       # train steps of its one-step distillation (0: none)
      eval_steps=(1, 2, 4),     # the 2-rectified flow's sampling steps evaluated
  ))
  config.data.batch_size = 64
  config.optim.update(lr=5e-4, warmup_steps=0, schedule="linear", final_lr_fraction=0.0,
                      ema_decay=0.995)
  config.teacher.sampling_steps = 64
  config.train.update(log_every=50, save_every=250, eval_every=500)
  return config


def validate(config):
  r = config.reflow
  check(r.couplings >= 1, "reflow.couplings", f"must be >= 1, got {r.couplings}")
  check(r.coupling_steps >= 1, "reflow.coupling_steps", f"must be >= 1, got {r.coupling_steps}")
  check(r.reflow_steps >= 1, "reflow.reflow_steps", f"must be >= 1, got {r.reflow_steps}")
  check(r.distill_steps >= 0, "reflow.distill_steps", f"must be >= 0, got {r.distill_steps}")
  config_lib.check_step_counts("reflow.eval_steps", r.eval_steps)


def sampling_mode(config) -> str:
  return "ddim"


def make_objective(exp, num_steps=None):
  c = exp.config
  return ReflowObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim,
                         num_steps or c.reflow.reflow_steps, exp.data_shape,
                         weighting=c.diffusion.loss_weighting, min_snr_gamma=c.diffusion.min_snr_gamma)


def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  r = config.reflow
  teacher = teachers.load_teacher(exp)
  guidance = config.diffusion.guidance
  exp.evaluator.set_teacher(teacher, config.teacher.sampling_steps, guidance=guidance)
  objective = make_objective(exp)
  frozen_shardings = ReflowFrozen(couplings=partitioning.replicated(exp.mesh))
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings=frozen_shardings)
  make_state = common.state_maker(objective, compiled)
  plan = [("reflow", r.reflow_steps, list(r.eval_steps))]
  if r.distill_steps:
    plan.append(("distill", r.distill_steps, [1]))
  source, source_guidance, offset, exported = teacher, guidance, 0, {}
  for k, (name, num_steps, eval_steps) in enumerate(plan):
    directory = os.path.join(workdir, "stages", f"{k}_{name}")
    start = time.time()
    couplings = teacher_couplings(exp.denoiser, exp.schedule, source, exp.data_shape, r.couplings,
                                  config.seed + 101 + k, 1, r.coupling_steps, source_guidance)
    logging.info("Stage %d (%s): %d couplings (%d ODE steps) in %.0f s", k, name, r.couplings,
                 r.coupling_steps, time.time() - start)
    settings = loop.Settings.from_config(config, num_steps=num_steps, seed=config.seed + k)
    trained = common.train(
        exp, objective, settings, workdir=directory, train_data=exp.train_data(seed_offset=k),
        evaluate=common.fd_callback(exp, eval_steps, prefix=f"{name}: "),
        best_metric=f"fd_{eval_steps[0]}steps", compiled=compiled,
        frozen=ReflowFrozen(couplings=couplings),
        stage=ReflowStage(distill=name == "distill", num_steps=num_steps),
        initial_state=lambda source=source: make_state(source), metric_prefix=f"{name}/",
        global_step_offset=offset, meta={"stage": k, "name": name})
    offset += num_steps
    source, source_guidance = objective.eval_params(trained.state), 0.0
    common.export(source, config, os.path.join(directory, EXPORT), "ddim", eval_steps[0])
    exported[name] = (source, eval_steps, trained.last_eval)
  common.export(source, config, os.path.join(workdir, EXPORT), "ddim", plan[-1][2][0])
  rows = common.teacher_rows(exp, teacher, r.eval_steps, guidance)
  for name, (params, eval_steps, last_eval) in exported.items():
    label = {"reflow": "2-rectified flow", "distill": "2-rectified flow, distilled"}[name]
    rows += [(label, row) for row in common.fd_table(exp, params, eval_steps, last_eval=last_eval,
                                                      name=f"{name}_")]
  common.write_summary(
      workdir, f"Reflow: {config.preset}",
      [f"{r.couplings} couplings per stage ({r.coupling_steps} ODE steps), {r.reflow_steps} reflow "
       f"+ {r.distill_steps} distillation train steps, wall time "
       f"{(time.time() - run_start) / 60:.1f} min (this invocation); metrics on "
       f"{exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["model", "steps", *common.METRIC_HEADER, "ms / sample"],
      [[name, row["steps"], *common.metric_cells(row), f"{row['ms_per_sample']:.3f}"]
       for name, row in rows],
      common.floor_lines(exp))
  return source
