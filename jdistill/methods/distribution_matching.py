"""DMD2 and TDM's driver (`configs/dmd.py`, `configs/tdm.py`; the math:
objectives/distribution_matching.py): loads the teacher, computes the regression pairs when the
config asks for them, trains generator and critic through the one loop, keeps the best-evaluated
generator (`best/`; these methods oscillate), exports the generator and ends with an FD / speed
table of the teacher and the generator at each evaluated step count."""
from __future__ import annotations

import os
import time

import ml_collections
from absl import logging

from jdistill import config as config_lib
from jdistill import partitioning
from jdistill.config import check
from jdistill.errors import check_choice
from jdistill.methods import common
from jdistill.models.lora import make_lora
from jdistill.models.unet import MAX_STEPS
from jdistill.objectives import state as state_lib
from jdistill.objectives.distribution_matching import (REGRESSION_SOURCES, VARIANTS,
                                                       DistributionMatchingFrozen,
                                                       DistributionMatchingObjective)
from jdistill.diffusion.losses import WEIGHTINGS
from jdistill.train import loop, setup, teachers

CONTROLS = frozenset({"lora", "guidance", "student_guidance"})   # optional controls (methods/common.py)
EXPORT = "generator.msgpack"
PARAMS_KEY = "generator/ema_params"


def get_config(preset: str = "digits", variant: str = "dmd2"):
  """Defaults of DMD2 / TDM (configs/dmd.py, configs/tdm.py). The digits DMD2 default is DMD2
  plus DMD1's regression (weight 1, 2:1 critic updates); `paper_recipe` is DMD2 as published."""
  check_choice("dmd.variant", variant, VARIANTS)
  config = config_lib.base_config(preset)
  preset = config_lib.data_preset(config.preset)    # `digits_flow` is sized like `digits`
  config.method = "dmd"
  tdm = variant != "dmd2"
  config.dmd = ml_collections.ConfigDict(dict(
      variant=variant,
      generator_steps=4 if tdm else 1,
      critic_updates_per_generator=5,   # two time-scales (TDM's paper: 1:1; why 5:1 here:
                                        # docs/results.md)
      t_min=0.02, t_max=0.98,
      critic_lr=1e-4,
      # DMD2: the teacher's own denoising loss; TDM: x0-MSE x min(SNR, 5)
      critic_weighting="min_snr" if tdm else config.diffusion.loss_weighting,
      regression_weight=0.0, regression_steps=32,     # DMD1 regression to the teacher's ODE from
      regression_pairs=1024,                           # fixed noise, computed before training
                                                       # (K > 1: every step onto its segment)
      regression_source="pairs",   # 'pairs' (those fixed trajectories) or 'data': step k from data
                                   # noised to t_k, the teacher's segment computed online
      gan_weight=0.0,                                  # GAN head on the critic's bottleneck
      huber_c=1e-3 if variant == "tdm" else 0.03,      # TDM pseudo-Huber constant (the
                                                       # paper's 1e-3; 'tdm_fresh_noise': 0.03)
      unify_steps=(),          # TDM-unify: e.g. (1, 2, 4), one generator told its step count
      step_intervals=tdm,      # TDM: match step k's output only at its noise levels [s_k, t_k]
      step_aware_critic=True,  # K > 1: the critic is told which step made each sample (p_k, not
                               # their mixture); ids over all step counts must fit MAX_STEPS
      eval_steps=(1, 2, 4),
  ))
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", ema_decay=0.99, b1=0.0, b2=0.99)
  config.teacher.sampling_steps = 64
  config.train.update(num_steps=2500 if not tdm else 1500, log_every=50, eval_every=500,
                      save_every=250)
  if preset == "digits":        # sized for a 2-core CPU: few updates, so larger steps
    config.data.batch_size = 32
    config.optim.update(lr=5e-4, schedule="cosine", final_lr_fraction=0.1)
    # regression to the teacher's 16-step DDIM ODE (DMD2: 8192 fixed trajectories)
    config.dmd.update(critic_lr=5e-4, regression_steps=16, regression_pairs=8192)
    if tdm:   # the regression along the teacher's trajectory leads (TDM's normalised gradient is
      # ~30x the regression's at weight 1), from data noised to t_k (docs/results.md)
      config.dmd.update(regression_weight=100.0, regression_source="data")
      config.train.update(num_steps=5000, eval_every=1000)   # 1000 generator updates
    else:     # 2:1 and regression weight 1 (docs/results.md)
      config.dmd.update(critic_updates_per_generator=2, regression_weight=1.0)
      config.train.update(num_steps=3500, eval_every=700)
    # the final table on 5000 samples: FD's spread over noise seeds is large at 1000
    config.eval.final_num_samples = 5000
  if preset == "toy2d":
    config.train.update(num_steps=3000 if not tdm else 6000, eval_every=1000 if not tdm else 2000)
  return config


def paper_recipe(config):
  """DMD2 as its paper trains it (`configs/dmd.py:<preset>_paper`): no DMD1 regression, 5 critic
  updates per generator update, the GAN head (generator weight 3e-3, DMD2's ImageNet setting) and
  AdamW (0.9, 0.999) with weight decay 0.01 for both networks. Learning rates, schedule, EMA and
  the budget stay the preset's. Deviations kept: docs/architecture.md."""
  config.dmd.update(regression_weight=0.0, critic_updates_per_generator=5, gan_weight=3e-3)
  config.optim.update(name="adamw", b1=0.9, b2=0.999, weight_decay=0.01)
  return config


def validate(config):
  d = config.dmd
  check_choice("dmd.variant", d.variant, VARIANTS)
  check(1 <= d.generator_steps <= MAX_STEPS, "dmd.generator_steps", f"must be in 1..{MAX_STEPS}")
  check(d.critic_updates_per_generator >= 1, "dmd.critic_updates_per_generator", "must be >= 1")
  check(0.0 <= d.t_min < d.t_max <= 1.0, "dmd.t_min", "need 0 <= t_min < t_max <= 1")
  check(d.critic_lr > 0, "dmd.critic_lr", f"must be > 0, got {d.critic_lr}")
  check(d.huber_c > 0, "dmd.huber_c", f"must be > 0 (the pseudo-Huber constant), got {d.huber_c}")
  check(d.gan_weight >= 0, "dmd.gan_weight", f"must be >= 0 (0: no GAN head), got {d.gan_weight}")
  check_choice("dmd.critic_weighting", d.critic_weighting, WEIGHTINGS)
  check_choice("dmd.regression_source", d.regression_source, REGRESSION_SOURCES)
  check(d.regression_weight == 0 or d.regression_source != "pairs" or d.regression_pairs >= 1,
        "dmd.regression_pairs", "must be >= 1 when regression_weight > 0")
  check(d.regression_steps >= 1, "dmd.regression_steps", f"must be >= 1, got {d.regression_steps}")
  check(all(1 <= k <= MAX_STEPS for k in d.unify_steps), "dmd.unify_steps",
        f"step counts must be in 1..{MAX_STEPS}, got {tuple(d.unify_steps)}")
  counts = set(d.unify_steps or (d.generator_steps,))
  check(not d.step_aware_critic or sum(counts) <= MAX_STEPS, "dmd.step_aware_critic",
        f"one id per (K, k) step: the step counts {sorted(counts)} sum to {sum(counts)} > {MAX_STEPS}")
  told = bool(d.unify_steps) or (d.step_aware_critic and max(counts) > 1)
  check(not config.lora.rank or not told, "lora.rank",
        "LoRA generator and critic adapt the teacher itself, which has no step embedding: use it "
        "without dmd.unify_steps, and with dmd.step_aware_critic=False when K > 1")
  if config_lib.student_guidance_range(config):
    check(not config.lora.rank, "lora.rank", "LoRA generator and critic adapt the teacher "
          "itself, which has no guidance embedding: use one of lora and student_guidance")
    check(d.gan_weight == 0, "dmd.gan_weight", "the GAN head reads the critic's features without "
          "its w: use gan_weight=0 with student_guidance")


def sampling_mode(config) -> str:
  """DMD2 generators sample by re-noising each x_hat with fresh noise; TDM follows DDIM."""
  return "renoise" if config.dmd.variant == "dmd2" else "ddim"


def make_objective(exp, num_steps):
  c, d = exp.config, exp.config.dmd
  critic_optim = c.optim.copy_and_resolve_references()
  critic_optim.lr = d.critic_lr
  return DistributionMatchingObjective(
      exp.denoiser, exp.schedule, state_lib.make_optimizer(c.optim),
      state_lib.make_optimizer(critic_optim), c.optim, critic_optim, exp.data_shape, num_steps,
      variant=d.variant, generator_steps=d.generator_steps,
      critic_updates_per_generator=d.critic_updates_per_generator, t_min=d.t_min, t_max=d.t_max,
      guidance=c.diffusion.guidance, critic_weighting=d.critic_weighting,
      min_snr_gamma=c.diffusion.min_snr_gamma,
      regression_weight=d.regression_weight, regression_steps=d.regression_steps,
      regression_source=d.regression_source,
      gan_weight=d.gan_weight, huber_c=d.huber_c,
      unify_steps=tuple(d.unify_steps), step_intervals=d.step_intervals,
      step_aware_critic=d.step_aware_critic, clip_x=c.diffusion.clip_x, lora=make_lora(c),
      guidance_range=config_lib.student_guidance_range(c))


def train(config, workdir: str):
  exp = setup.build(config, workdir)
  d = config.dmd
  mode = sampling_mode(config)
  teacher = teachers.load_teacher(exp)
  # the real score is the guided teacher: the generator learns its guided distribution and samples
  # without guidance; the teacher's rows sample with it. A guidance-conditioned generator learns
  # every w of student_guidance and is told its w (evaluations at eval_w)
  w_range = config_lib.student_guidance_range(config)
  guidance = config.student_guidance.eval_w if w_range else config.diffusion.guidance
  told = guidance if w_range else 0.0      # what the generator's evaluations tell it
  exp.evaluator.set_teacher(teacher, config.teacher.sampling_steps, guidance=guidance)
  num_steps = config.train.num_steps
  objective = make_objective(exp, num_steps)
  regression, regression_sharding = None, None
  if d.regression_weight > 0 and d.regression_source == "pairs":
    start = time.time()
    regression = objective.regression_pairs(teacher, d.regression_pairs, config.seed + 101)
    regression_sharding = partitioning.replicated(exp.mesh)
    logging.info("Regression pairs: %d teacher ODE trajectories (%d DDIM steps) in %.0f s",
                 d.regression_pairs, d.regression_steps, time.time() - start)
  frozen = DistributionMatchingFrozen(teacher=teacher, regression=regression)
  frozen_shardings = DistributionMatchingFrozen(teacher=exp.param_shardings(),
                                                regression=regression_sharding)
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings=frozen_shardings)
  make_state = common.state_maker(objective, compiled)
  # the generator's own step count first: its samples make the TensorBoard grid
  eval_steps = [d.generator_steps] + sorted(set(d.eval_steps) - {d.generator_steps})
  trained = common.train(
      exp, objective, loop.Settings.from_config(config), workdir=workdir,
      train_data=exp.train_data(),
      evaluate=common.fd_callback(exp, eval_steps, mode=mode, guidance=told),
      best_metric=f"fd_{d.generator_steps}steps", compiled=compiled, frozen=frozen,
      initial_state=lambda: make_state(teacher), meta={"method": d.variant})
  generator = objective.eval_params(trained.state, frozen)
  common.export(generator, config, os.path.join(workdir, EXPORT), mode, d.generator_steps,
                guidance=told, adapters=common.adapters(objective, trained.state.generator,
                                                        "the teacher"))
  n_teacher = config.teacher.sampling_steps
  best = trained.best
  best_line = ([f"Best evaluated {d.generator_steps}-step FD in this invocation: {best.value:.4g} "
                f"at step {best.step} (kept in {workdir}/best)."] if best.step is not None else [])
  if w_range:
    common.write_student_guidance_summary(
        exp, teacher, [(f"{d.variant} generator", generator, n, mode, None) for n in eval_steps],
        f"{d.variant.upper()}, guidance-conditioned: {config.preset}",
        f"{num_steps} train steps ({num_steps // d.critic_updates_per_generator} generator "
        f"updates), wall time {trained.seconds / 60:.1f} min (this invocation)", best_line)
    return generator
  teacher_rows = common.fd_table(exp, teacher, [n_teacher], name="teacher_", guidance=guidance)
  generator_rows = common.fd_table(exp, generator, eval_steps, mode=mode,
                                   last_eval=trained.last_eval, name="generator_")
  rows = [("teacher (DDIM)", r) for r in teacher_rows] + [(f"{d.variant} generator", r)
                                                         for r in generator_rows]
  common.write_summary(
      workdir, f"{d.variant.upper()}: {config.preset}",
      [f"{num_steps} train steps ({num_steps // d.critic_updates_per_generator} generator "
       f"updates), wall time {trained.seconds / 60:.1f} min (this invocation); FD on "
       f"{exp.evaluator.final_num_samples} samples vs the held-out split"],
      ["model", "steps", *common.METRIC_HEADER, "ms / sample"],
      [[name, r["steps"], *common.metric_cells(r), f"{r['ms_per_sample']:.3f}"] for name, r in rows],
      best_line + common.floor_lines(exp))
  return generator
