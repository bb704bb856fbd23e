"""Progressive distillation (Salimans & Ho, 2022): a student learns to do two teacher DDIM steps in
one; repeated, halving the steps each stage, each student becoming the next stage's teacher.

For a student with N steps: i ~ U{0..N-1}, t = (i+1)/N, s = t - 1/N, z_t = alpha_t x + sigma_t eps.
The teacher takes k deterministic DDIM steps t -> ... -> s from z_t (k = 2: t -> t - 1/2N -> s),
landing on z_s~. The student's target is the x that one student DDIM step from z_t maps onto z_s~:

    x_target = (z_s~ - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)

and at the last step (s = 0) the teacher's own x prediction. The 'direct' variant
(`two_step=False`) always distils from the original teacher with k = N_teacher / N teacher steps
per student step (for N = 1: noise -> the teacher's full multi-step sample).

Student steps N, teacher sub-steps k and the stage length are traced values in `stage`, so one
compilation serves the whole schedule.
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import serialization

from jdistill import curriculum as curriculum_lib
from jdistill import files
from jdistill.data import pipeline
from jdistill.diffusion import sampling
from jdistill.eval.evaluate import image_grid, save_png
from jdistill.diffusion.losses import per_example_mse, weighted_x_loss
from jdistill.diffusion.parameterization import forward_process
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup
from jdistill.train import teacher as teacher_lib
from jdistill.train import state as state_lib


# ----------------------------------------------------------------------------- the math

def sample_student_time(rng, batch, student_steps):
  """i ~ U{0..N-1}; t = (i+1)/N, s = i/N."""
  i = jax.random.randint(rng, (batch,), 0, student_steps)
  n = student_steps.astype(jnp.float32)
  return (i + 1).astype(jnp.float32) / n, i.astype(jnp.float32) / n


@dataclasses.dataclass(frozen=True)
class FeatureDistillation:
  """loss += w(step) * mean_l ||f_l(student) - f_l(teacher)||^2 over U-Net activations `layers`,
  w moving from `weight_start` to `weight_end` over the stage (`linear` or `cosine`)."""
  layers: tuple = ("bottleneck",)
  weight_start: float = 1.0
  weight_end: float = 0.0
  schedule: str = "cosine"

  def weight(self, step, total):
    progress = jnp.clip(step / jnp.maximum(total, 1).astype(jnp.float32), 0.0, 1.0)
    if self.schedule == "linear":
      return self.weight_start + (self.weight_end - self.weight_start) * progress
    if self.schedule == "cosine":
      return self.weight_end + (self.weight_start - self.weight_end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    raise ValueError(f"config.features.schedule: unknown {self.schedule!r}; use linear or cosine")


@dataclasses.dataclass(frozen=True)
class ProgressiveObjective:
  denoiser: Any
  schedule: Any
  optimizer: Any
  optim: Any                      # config.optim (lr schedule, EMA decay and warmup)
  data_shape: tuple
  weighting: str = "snr_trunc"
  curriculum: Any = None          # None: i ~ U{0..N-1}; else an AdaptiveCurriculumScheduler
  features: Optional[FeatureDistillation] = None
  lora: Any = None                # a LoRA: only adapters train, over the frozen 'student_base'

  def new_state(self, student_init, rng=None):
    """A fresh student state: full params, or LoRA adapters over `student_init`."""
    params = student_init
    if self.lora is not None:
      params = self.lora.init(jax.random.key(0) if rng is None else rng, nn.unbox(student_init))
    return curriculum_lib.attach(self.curriculum, state_lib.create(params, self.optimizer))

  def init_state(self, rng, frozen=None):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def student_params(self, trainable, frozen):
    return trainable if self.lora is None else self.lora.merge(frozen["student_base"], trainable)

  def student_times(self, state, rng, batch, student_steps):
    """(t, s, importance weight) for the student's step t -> s on its N-step grid."""
    if self.curriculum is None:
      t, s = sample_student_time(rng, batch, student_steps)
      return t, s, jnp.ones((batch,))
    u, _ = self.curriculum.sample(state.curriculum, rng, batch)
    i = jnp.minimum(jnp.floor(u * student_steps), student_steps - 1)
    n = student_steps.astype(jnp.float32)
    return (i + 1) / n, i / n, self.curriculum.discrete_weight(state.curriculum, i, student_steps)

  def targets(self, teacher_params, batch, rng_eps, t, s, stage):
    """(z_t, logsnr_t, x_target, label) for one batch; no gradient flows into the teacher."""
    x = batch["x"]
    eps = jax.random.normal(rng_eps, x.shape)
    z_t, logsnr_t = forward_process(x, t, eps, self.schedule)
    label = batch["label"] if self.denoiser.num_classes else None
    predict = lambda z, logsnr: self.denoiser.predict(teacher_params, z, logsnr, label)
    z_s, teacher_x = sampling.ddim_segment(predict, self.schedule, z_t, t, s, stage["teacher_substeps"])
    x_target = sampling.ddim_x_target(z_t, z_s, teacher_x, logsnr_t, self.schedule(s), s)
    return z_t, logsnr_t, jax.lax.stop_gradient(x_target), label

  def train_step(self, state, batch, rng, frozen, stage):
    rng_target, rng_dropout = jax.random.split(rng)
    rng_t, rng_eps = jax.random.split(rng_target)
    t, s, importance = self.student_times(state, rng_t, batch["x"].shape[0], stage["student_steps"])
    z_t, logsnr_t, x_target, label = self.targets(frozen["teacher"], batch, rng_eps, t, s, stage)
    if self.features is not None:
      _, teacher_features = self.denoiser.predict_with_features(
          frozen["teacher"], z_t, logsnr_t, label, self.features.layers)
      feature_weight = self.features.weight(state.step, stage["num_steps"])

    def loss_fn(trainable):
      params = self.student_params(trainable, frozen)
      if self.features is None:
        pred = self.denoiser.predict(params, z_t, logsnr_t, label, train=True, rng=rng_dropout)
        feature_loss = jnp.zeros(())
      else:
        pred, student_features = self.denoiser.predict_with_features(
            params, z_t, logsnr_t, label, self.features.layers, train=True, rng=rng_dropout)
        feature_loss = sum(jnp.mean(jnp.square(a - jax.lax.stop_gradient(b)))
                           for a, b in zip(student_features, teacher_features)) / len(student_features)
      per_example = weighted_x_loss(pred.x0, x_target, logsnr_t, self.weighting)
      loss = jnp.mean(importance * per_example)
      if self.features is not None:
        loss = loss + feature_weight * feature_loss
      return loss, (pred.x0, per_example, feature_loss)

    (loss, (x_hat, per_example, feature_loss)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    lr = state_lib.learning_rate(self.optim, state.step, stage["num_steps"])
    new_state = state_lib.apply_gradients(state, grads, self.optimizer, self.optim.ema_decay, lr,
                                          self.optim.ema_warmup)
    metrics = {
        "distill_loss": jnp.mean(per_example),
        "reconstruction_mse": jnp.mean(per_example_mse(x_hat, batch["x"])),  # diagnostic: vs data x
        "grad_norm": state_lib.global_norm(grads), "lr": lr}
    if self.features is not None:
      metrics.update(feature_loss=feature_loss, feature_weight=feature_weight)
    position = s + 0.5 / stage["student_steps"]            # the middle of the student's step
    new_state = curriculum_lib.advance(self.curriculum, state, new_state, position, per_example,
                                       metrics)
    new_state, metrics["nonfinite"] = state_lib.keep_if_finite(new_state, state, loss)
    return new_state, metrics

  def validation_loss(self, params, teacher_params, batch, rng, stage):
    """Mean distillation loss of `params` with uniform student times (comparable across samplers)."""
    rng_t, rng_eps = jax.random.split(rng)
    t, s = sample_student_time(rng_t, batch["x"].shape[0], stage["student_steps"])
    z_t, logsnr_t, x_target, label = self.targets(teacher_params, batch, rng_eps, t, s, stage)
    pred = self.denoiser.predict(params, z_t, logsnr_t, label)
    return jnp.mean(weighted_x_loss(pred.x0, x_target, logsnr_t, self.weighting))

  def eval_params(self, state, frozen=None):
    return self.student_params(state.ema_params, frozen)


# ----------------------------------------------------------------------------- the schedule

class ScheduleError(ValueError):
  pass


def step_schedule(config, teacher_steps: int):
  """The sequence of sampling-step counts: teacher first, then each stage's student.

  Default: strict halving from the teacher's steps to 1. Explicit: `config.progressive.steps`
  like "25,13,7,4,2,1" (teacher first). Ratios far from 2 are accepted with a warning."""
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
  if config.progressive.two_step:
    for k, (a, b) in enumerate(zip(steps, steps[1:])):
      if not 1.75 <= a / b <= 2.25:
        logging.warning("progressive stage %d (%d -> %d steps) has ratio %.2f, not ~2: the teacher "
                        "still takes 2 DDIM steps per student step (on a 1/%d grid)", k, a, b, a / b, 2 * b)
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


# ----------------------------------------------------------------------------- the driver

def train(config, workdir: str):
  run_start = time.time()
  exp = setup.build(config, workdir)
  p = config.progressive
  original_teacher = teacher_lib.load_teacher(exp)
  steps = step_schedule(config, config.teacher.sampling_steps)
  num_stages = len(steps) - 1
  train_steps = stage_train_steps(config, num_stages, len(exp.train_source.records))
  if not 0 <= p.start_stage < num_stages:
    raise ScheduleError(f"config.progressive.start_stage={p.start_stage} is outside 0..{num_stages - 1}")
  logging.info("Progressive schedule %s (%s), train steps per stage %s, %s target",
               " -> ".join(map(str, steps)), "two-step" if p.two_step else "direct",
               train_steps, "2-step" if p.two_step else "direct")

  objective = make_objective(exp)
  param_shardings = exp.param_shardings()
  frozen_shardings = {"teacher": param_shardings}
  if objective.lora is not None:
    frozen_shardings["student_base"] = param_shardings
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings=frozen_shardings)
  make_state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)
  validation_batch = pipeline.all_examples(exp.test_source, p.validation_examples)
  validation_loss = jax.jit(objective.validation_loss)

  teacher_result = exp.evaluator.evaluate(original_teacher, steps[0], final=True)[0]
  teacher_fd = teacher_result["fd"]
  teacher_ms = exp.evaluator.speed(teacher_result, original_teacher, steps[0])
  logging.info("Original teacher: %d DDIM steps, FD %.4g, %.3f ms/sample", steps[0], teacher_fd, teacher_ms)
  rows = [dict(stage="teacher", steps=steps[0], student_fd=teacher_fd, ddim_fd=teacher_fd,
               ms_per_sample=teacher_ms, speedup=1.0)]

  teacher = original_teacher
  if p.start_stage > 0 and not config.teacher.checkpoint:
    previous = stage_dir(workdir, p.start_stage - 1, steps[p.start_stage])
    teacher = ckpt_lib.restore_params(os.path.join(previous, "checkpoints"), exp.abstract_params())
  offset = sum(train_steps[:p.start_stage])
  for k in range(p.start_stage, num_stages):
    n_teacher, n_student = steps[k], steps[k + 1]
    directory = stage_dir(workdir, k, n_student)
    stage = {"student_steps": jnp.int32(n_student), "num_steps": jnp.int32(train_steps[k]),
             "teacher_substeps": jnp.int32(2 if p.two_step else steps[0] // n_student)}
    frozen = {"teacher": teacher if p.two_step else original_teacher}
    if objective.lora is not None:
      frozen["student_base"] = teacher
    best_manager = ckpt_lib.manager(os.path.join(directory, "best"), max_to_keep=1)

    def on_best(state, scalars, step, best_manager=best_manager):
      ckpt_lib.save(best_manager, step, state, {"step": step, **scalars}, force=True)

    last_eval = {}

    def evaluate(params, step, n_student=n_student, k=k, last_eval=last_eval, frozen=frozen,
                 stage=stage):
      result, samples = exp.evaluator.evaluate(params, n_student)
      last_eval.update(result=result, samples=samples)
      scalars = dict(result)
      if p.validation_examples:
        scalars["val_loss"] = float(validation_loss(params, frozen["teacher"], validation_batch,
                                                    jax.random.key(k), stage))
      logging.info("stage %d (%d steps) eval at step %d: %s", k, n_student, step,
                   "  ".join(f"{key}={v:.4g}" for key, v in scalars.items()))
      return scalars, {"samples": image_grid(samples)[None]}

    logging.info("Stage %d/%d: %d -> %d steps, %d train steps -> %s", k + 1, num_stages, n_teacher,
                 n_student, train_steps[k], directory)
    state, _ = loop.run(
        objective, workdir=directory, mesh=exp.mesh, train_data=exp.train_data(seed_offset=k),
        num_steps=train_steps[k], writer=exp.writer, frozen=frozen, stage=stage,
        evaluate=evaluate, compiled=compiled, seed=config.seed + k, log_every=config.train.log_every,
        eval_every=p.eval_every, save_every=config.train.save_every,
        metric_prefix=f"stage{k}_{n_student}steps/", global_step_offset=offset,
        on_best=on_best, best_metric=p.best_metric,
        early_stopping_patience=config.train.early_stopping_patience,
        initial_state=lambda: make_state(teacher), meta={"stage": k, "student_steps": n_student,
                                                         "teacher_steps": n_teacher})
    best_manager.wait_until_finished()
    offset += train_steps[k]
    student = objective.eval_params(state, frozen)
    if objective.lora is not None:        # the checkpoint holds adapters: export merged weights
      files.write_bytes(os.path.join(directory, "student.msgpack"),
                           serialization.to_bytes(jax.device_get(student)))
    rows.append(stage_row(exp, directory, k, n_student, student, original_teacher, teacher_ms,
                          last_eval))
    teacher = student
  write_summary(workdir, rows, time.time() - run_start, steps, exp)
  return teacher


def make_objective(exp):
  from jdistill.models.lora import make_lora
  c, p = exp.config, exp.config.progressive
  features = None
  if c.features.weight_start or c.features.weight_end:
    features = FeatureDistillation(tuple(c.features.layers), c.features.weight_start,
                                   c.features.weight_end, c.features.schedule)
  return ProgressiveObjective(exp.denoiser, exp.schedule, exp.optimizer(), c.optim, exp.data_shape,
                              p.loss_weighting,
                              curriculum=curriculum_lib.make_scheduler(c), features=features,
                              lora=make_lora(c))


def stage_dir(workdir, k, n_student):
  return os.path.join(workdir, "stages", f"{k}_{n_student}steps")


def stage_row(exp, directory, k, n_student, student, original_teacher, teacher_ms, last_eval):
  """Stage results (cached in <stage>/result.json so a resumed run does not recompute them);
  `last_eval` holds the loop's end-of-stage evaluation of `student` unless the stage was already
  trained before this invocation."""
  path = os.path.join(directory, "result.json")
  cached = files.read_json(path)
  if cached is not None:
    return cached
  if not last_eval or not exp.evaluator.final_reuses_training_count:
    result, samples = exp.evaluator.evaluate(student, n_student, final=True)
    last_eval = dict(result=result, samples=samples)
  student_fd, student_samples = last_eval["result"]["fd"], last_eval["samples"]
  ddim_result, ddim_samples = exp.evaluator.evaluate(original_teacher, n_student, final=True)
  save_png(image_grid(student_samples), os.path.join(directory, "student_samples.png"))
  save_png(image_grid(ddim_samples), os.path.join(directory, "ddim_teacher_samples.png"))
  ms = exp.evaluator.speed(last_eval["result"], student, n_student)
  row = dict(stage=k, steps=n_student, student_fd=float(student_fd), ddim_fd=ddim_result["fd"],
             ms_per_sample=ms, speedup=teacher_ms / ms)
  exp.writer.write_scalars(k, {"summary/student_fd": row["student_fd"],
                               "summary/ddim_teacher_fd": row["ddim_fd"],
                               "summary/ms_per_sample": ms})
  logging.info("Stage %d done: %d steps, student FD %.4g, DDIM teacher FD %.4g, %.3f ms/sample "
               "(%.1fx faster than the teacher)", k, n_student, row["student_fd"], row["ddim_fd"], ms,
               row["speedup"])
  files.write_json(path, row)
  return row


def write_summary(workdir, rows, seconds, steps, exp):
  if jax.process_index() != 0:
    return
  lines = [f"# Progressive distillation: {exp.config.preset}", "",
           f"schedule {' -> '.join(map(str, steps))}, wall time {seconds / 60:.1f} min "
           f"(this invocation), FD on {exp.evaluator.final_num_samples} samples vs the held-out split", "",
           "| stage | steps | student FD | DDIM teacher FD (same steps) | ms / sample | speedup |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['stage']} | {r['steps']} | {r['student_fd']:.4g} | {r['ddim_fd']:.4g} | "
                 f"{r['ms_per_sample']:.3f} | {r['speedup']:.1f}x |")
  text = "\n".join(lines) + "\n"
  files.write_text(os.path.join(workdir, "summary.md"), text)
  logging.info("\n%s", text)
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
