"""Teacher training (`configs/teacher.py`): the denoising objective, an FD table over DDIM step
counts, and the exported EMA teacher (`workdir/teacher.msgpack` + `teacher.json`). With
`config.teacher.checkpoint` set, it fine-tunes that teacher instead of starting afresh."""
from __future__ import annotations

import os

from jdistill import config as config_lib
from jdistill import curriculum as curriculum_lib
from jdistill.config import check
from jdistill.methods import common
from jdistill.models.lora import make_lora
from jdistill.objectives.denoising import DenoisingFrozen, DenoisingObjective
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"curriculum", "lora", "guidance", "time_sampling"})   # optional controls it supports (methods/common.py)
EXPORT = "teacher.msgpack"                # the run's exported model, for jdistill.sample
PARAMS_KEY = "ema_params"                 # what sampling restores from an Orbax checkpoint


def get_config(preset: str = "digits"):
  config = config_lib.base_config(preset)
  config.method = "teacher"
  return config


def validate(config):
  check(not config.lora.rank or config.teacher.checkpoint, "lora.rank",
        "a LoRA adapts a trained teacher: set config.teacher.checkpoint (a fine-tune)")
  if not config.teacher.checkpoint:
    config_lib.warn_if_ema_keeps_the_init(config)


def sampling_mode(config) -> str:
  return "ddim"


def make_objective(exp, num_steps):
  c = exp.config
  return DenoisingObjective(
      denoiser=exp.denoiser, schedule=exp.schedule, optimizer=exp.optimizer(), optim=c.optim,
      num_steps=num_steps, data_shape=exp.data_shape, weighting=c.diffusion.loss_weighting,
      min_snr_gamma=c.diffusion.min_snr_gamma, label_dropout=c.diffusion.label_dropout,
      time_sampling=c.diffusion.time_sampling, logit_mean=c.diffusion.logit_mean,
      logit_std=c.diffusion.logit_std, curriculum=curriculum_lib.make_scheduler(c), lora=make_lora(c))


def train(config, workdir: str):
  exp = setup.build(config, workdir)
  objective = make_objective(exp, config.train.num_steps)
  frozen, frozen_shardings, initial_state = None, None, None
  if objective.lora is not None:       # the adapters' base: the teacher being fine-tuned
    frozen = DenoisingFrozen(base=teachers.load_teacher(exp))
    frozen_shardings = DenoisingFrozen(base=exp.param_shardings())
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings)
  if config.teacher.checkpoint:        # fine-tune: start from a trained teacher's EMA params
    make_state = common.state_maker(objective, compiled)
    initial_state = lambda: make_state(frozen.base if frozen else teachers.load_teacher(exp))
  steps = config.eval.steps_during_training
  guidance = config.diffusion.guidance           # it learns the unconditional branch it guides with
  trained = common.train(
      exp, objective, loop.Settings.from_config(config), workdir=workdir,
      train_data=exp.train_data(), evaluate=common.fd_callback(exp, steps, guidance=guidance),
      compiled=compiled,
      best_metric=f"fd_{steps[0]}steps", frozen=frozen, initial_state=initial_state,
      meta={"method": "teacher", "config": config.to_json()})
  params = objective.eval_params(trained.state, frozen)
  common.export(params, config, os.path.join(workdir, EXPORT), "ddim", config.teacher.sampling_steps,
                guidance=guidance, adapters=common.adapters(
                    objective, trained.state, f"the teacher fine-tuned ({config.teacher.checkpoint or 'bundled'})"))
  exp.evaluator.set_teacher(params, config.teacher.sampling_steps,   # FD (teacher): to itself
                            guidance=guidance)
  rows = common.fd_table(exp, params, config.eval.final_steps, guidance=guidance)
  extras = ["swd"] if "swd" in rows[0] else []
  common.write_summary(
      workdir, f"Teacher: {config.preset}",
      [f"training wall time: {trained.seconds / 60:.1f} min, {config.train.num_steps} steps; "
       f"metrics on {exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["DDIM steps", *common.METRIC_HEADER, *extras, "ms / sample", "seconds"],
      [[r["steps"], *common.metric_cells(r), *(f"{r[k]:.4g}" for k in extras),
        f"{r['ms_per_sample']:.3f}", f"{r['seconds']:.1f}"] for r in rows],
      common.floor_lines(exp))
  return params
