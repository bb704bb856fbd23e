"""Multi-teacher distillation's driver (`configs/multi_teacher.py`; the math:
objectives/multi_teacher.py): the cache builds behind `python -m jdistill.cache`, then one student
trained on the teachers' cached predictions, an FD table of the student next to every teacher, and
the exported student."""
from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jdistill import config as config_lib
from jdistill import files, partitioning
from jdistill.config import check
from jdistill.data import cache as cache_lib
from jdistill.diffusion.losses import WEIGHTINGS
from jdistill.errors import ConfigError, check_choice
from jdistill.methods import common
from jdistill.models.lora import make_lora
from jdistill.objectives.multi_teacher import (MultiTeacherFrozen, MultiTeacherObjective,
                                               teacher_weights)
from jdistill.train import loop, setup, teachers
from jdistill.train.teachers import BUNDLED_DIGITS_FLOW_TEACHER, BUNDLED_DIGITS_TEACHER

CONTROLS = frozenset({"lora"})                   # optional controls it supports (methods/common.py)
EXPORT = "student.msgpack"
PARAMS_KEY = "ema_params"
LOSSES = ("mse", "huber")


def get_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Defaults of multi-teacher distillation from cached predictions (configs/multi_teacher.py)."""
  config = config_lib.base_config(preset)
  preset = config_lib.data_preset(config.preset)    # `digits_flow` is sized like `digits`
  config.method = "multi_teacher"
  config.cache = ml_collections.ConfigDict(dict(
      dir="",                   # "": <workdir>/cache
      encoder="identity",       # or "package.module:factory" returning a jdistill.data.cache.Encoder
      dtype="float32",          # latents, noise and predictions on disk: float32, float16, bfloat16
      buckets=(config.data.resolution or 8,),   # resolutions (side, or "HxW"); one per batch
      noise_draws=8,            # (t, eps) draws per sample: sample_id = "<index>:<draw>"
      base_seed=0,              # seed = first 32 bits of sha256(f"{sample_id}|{base_seed}")
      records_per_shard=1024,   # latent records per shard (teacher shards: x noise_draws)
      build_batch_size=256,
      skip_existing=True,       # resume a killed build shard by shard
      read_threads=2,           # grain threads reading and batching ahead of the train step
  ))
  config.multi_teacher = ml_collections.ConfigDict(dict(
      # id -> checkpoint (exported .msgpack or Orbax run dir) and weight (normalised to sum 1)
      teachers=ml_collections.ConfigDict(),
      student_init="",          # "": the heaviest teacher (ties: first id); "average" (the teachers'
                                # params averaged with their weights); "random"; or a checkpoint
      loss="mse",               # mse, or huber (of the weighted error, delta huber_delta)
      huber_delta=0.1,
      loss_weighting="v_mse",   # w(logsnr) on ||x_student - x_target||^2 (diffusion/losses.py)
      evaluate_teachers=True,   # FD of every teacher (teacher.sampling_steps) in the summary
  ))
  config.optim.update(lr=2e-4, warmup_steps=50, schedule="cosine", final_lr_fraction=0.1,
                      ema_decay=0.998)
  config.teacher.sampling_steps = 64
  config.eval.update(steps_during_training=(16,), final_steps=(64, 16))
  config.train.update(num_steps=1000, log_every=50, eval_every=500, save_every=250)
  if preset == "digits":        # the bundled teacher and two trained from scratch (configs/multi_teacher.py)
    # different seeds and budgets (16000, 3000, 2000 steps), so their errors are independent; a
    # student from scratch on their averaged prediction beats the mean teacher (docs/results.md)
    config.data.batch_size = 128
    config.cache.noise_draws = 64             # 1297 digits x 64 (t, eps) draws
    config.optim.update(lr=1e-3, warmup_steps=200, final_lr_fraction=0.05, ema_decay=0.998)
    config.multi_teacher.student_init = "random"
    config.train.update(num_steps=4000, eval_every=1000)
    flow = config.diffusion.schedule.name == "flow"       # digits_flow: flow teachers, trained alike
    runs = "runs/mt_teachers_flow" if flow else "runs/mt_teachers"
    config.multi_teacher.loss_weighting = config.diffusion.loss_weighting
    config.multi_teacher.teachers = ml_collections.ConfigDict({
        "base": dict(checkpoint=BUNDLED_DIGITS_FLOW_TEACHER if flow else BUNDLED_DIGITS_TEACHER,
                     weight=1.0),
        "s1": dict(checkpoint=f"{runs}/s1/teacher.msgpack", weight=1.0),
        "s2": dict(checkpoint=f"{runs}/s2/teacher.msgpack", weight=1.0)})
  return config


def validate(config):
  specs = config.multi_teacher.teachers
  check(len(specs) > 0, "multi_teacher.teachers",
        "no teachers; give id -> {checkpoint: ..., weight: ...}")
  for teacher_id in specs:
    field = f"multi_teacher.teachers.{teacher_id}"
    check(re.fullmatch(r"[A-Za-z0-9_.-]+", teacher_id) is not None, field,
          "an id is letters, digits, '_', '.' and '-' (it names a directory)")
    check(bool(specs[teacher_id].get("checkpoint")), f"{field}.checkpoint",
          "empty; give a .msgpack or an Orbax run directory")
    weight = specs[teacher_id].get("weight")
    check(isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0,
          f"{field}.weight", f"must be a number >= 0, got {weight!r}")
  check(sum(specs[t].weight for t in specs) > 0, "multi_teacher.teachers",
        "all weights are 0; at least one teacher needs a weight > 0")
  check_choice("multi_teacher.loss", config.multi_teacher.loss, LOSSES)
  check(config.multi_teacher.huber_delta > 0, "multi_teacher.huber_delta", "must be > 0")
  check_choice("multi_teacher.loss_weighting", config.multi_teacher.loss_weighting, WEIGHTINGS)
  c = config.cache
  check_choice("cache.dtype", c.dtype, cache_lib.DTYPES)
  for field in ("noise_draws", "records_per_shard", "build_batch_size", "read_threads"):
    check(c[field] >= 1, f"cache.{field}", f"must be >= 1, got {c[field]}")
  try:
    cache_lib.parse_buckets(c.buckets)
  except cache_lib.CacheError as e:
    raise ConfigError(str(e)) from e
  check(not config.lora.rank or config.multi_teacher.student_init != "random", "lora.rank",
        "a LoRA student adapts its initial weights: set multi_teacher.student_init to a teacher, "
        "'average' or a checkpoint, not 'random'")
  if config.multi_teacher.student_init == "random":
    config_lib.warn_if_ema_keeps_the_init(config)


def make_objective(exp, teacher_ids):
  c, mt = exp.config, exp.config.multi_teacher
  return MultiTeacherObjective(
      exp.denoiser, exp.schedule, exp.optimizer(), c.optim, c.train.num_steps, exp.data_shape,
      tuple(teacher_ids), mt.loss_weighting, c.diffusion.min_snr_gamma,
      mt.huber_delta if mt.loss == "huber" else None, lora=make_lora(c))


def cache_dir(config, workdir: str) -> str:
  """config.cache.dir, by default <workdir>/cache (`config` may be None)."""
  return (config.cache.dir if config is not None else "") or os.path.join(workdir, "cache")


def build_latents_cache(config, workdir: str):
  """`python -m jdistill.cache build-latents`: the train split through config.cache.encoder."""
  exp = setup.build(config, workdir, evaluator=False, record_config=False)
  c = config.cache
  return cache_lib.build_latents(
      exp.train_source, cache_dir(config, workdir), encoder=cache_lib.make_encoder(c.encoder),
      buckets=c.buckets, dtype=c.dtype, records_per_shard=c.records_per_shard,
      batch_size=c.build_batch_size, skip_existing=c.skip_existing,
      mesh=partitioning.local_mesh(config.mesh.fsdp), data=config.data.to_dict())


def build_teacher_cache(config, workdir: str, teacher_id: str):
  """`python -m jdistill.cache build-teacher --teacher=<id>`: one teacher's predictions."""
  exp = setup.build(config, workdir, evaluator=False, record_config=False)
  exp = dataclasses.replace(exp, mesh=partitioning.local_mesh(config.mesh.fsdp))   # process-local build
  checkpoint = config.multi_teacher.teachers[teacher_id].checkpoint
  c = config.cache
  return cache_lib.build_teacher(
      cache_dir(config, workdir), teacher_id, denoiser=exp.denoiser,
      params=teachers.load_checkpoint(checkpoint, exp.abstract_params(), config), schedule=exp.schedule,
      schedule_config=config.diffusion.schedule.to_dict(), buckets=c.buckets, base_seed=c.base_seed,
      noise_draws=c.noise_draws, checkpoint=checkpoint, dtype=c.dtype, batch_size=c.build_batch_size,
      skip_existing=c.skip_existing, mesh=exp.mesh)


def open_caches(config, workdir, teacher_ids):
  """The checked caches of `teacher_ids`, built with this config's buckets, seeds, draws, dtype and
  teacher checkpoints."""
  c = config.cache
  return cache_lib.open_training_caches(
      cache_dir(config, workdir), teacher_ids, buckets=c.buckets, base_seed=c.base_seed,
      noise_draws=c.noise_draws, schedule_config=config.diffusion.schedule.to_dict(), dtype=c.dtype,
      checkpoints={i: config.multi_teacher.teachers[i].checkpoint for i in teacher_ids})


def student_params(config, teacher_ids, weights, abstract_params):
  """Where a fresh student starts (multi_teacher.student_init): '' the heaviest teacher (ties: the
  first id); 'average' the teachers' parameters averaged with their weights w_k (a model soup:
  fine-tunes of one base model share its basin, so the soup starts near every teacher and nearer
  to none); a checkpoint path; or None for 'random'."""
  spec = config.multi_teacher.student_init
  checkpoints = {i: config.multi_teacher.teachers[i].checkpoint for i in teacher_ids}
  load = lambda path: teachers.load_checkpoint(path, abstract_params, config)
  if spec == "random":
    return None
  if spec == "average":
    trees = [load(checkpoints[i]) for i in teacher_ids]
    return jax.tree.map(lambda *leaves: sum(float(w) * leaf for w, leaf in zip(weights, leaves)), *trees)
  return load(spec or checkpoints[teacher_ids[int(np.argmax(weights))]])


def sampling_mode(config) -> str:
  return "ddim"


def train(config, workdir: str):
  mt = config.multi_teacher
  ids, weights = teacher_weights(mt.teachers)
  caches = open_caches(config, workdir, ids)
  exp = setup.build(config, workdir)
  if caches.latents["encoder"] != "identity" or any(
      shape[-1] != exp.data_shape[-1] for shape in caches.latents["latent_shapes"].values()):
    raise cache_lib.CacheError(
        f"{caches.cache_dir}: latents of encoder {caches.latents['encoder']!r} with shapes "
        f"{caches.latents['latent_shapes']}: this driver trains and evaluates (FD) in pixel space, "
        "so it needs an identity-encoder cache of the configured data")
  logging.info("Multi-teacher student: teachers %s, %d cached examples x %d teachers",
               ", ".join(f"{i} (w={w:.3g})" for i, w in zip(ids, weights)),
               caches.latents["num_records"] * caches.noise_draws, len(ids))
  objective = make_objective(exp, ids)
  frozen = MultiTeacherFrozen(weights=jnp.asarray(weights, jnp.float32))
  frozen_shardings = None
  if objective.lora is not None:  # the adapters' base: the student's initial weights
    frozen = frozen.replace(base=student_params(config, ids, weights, exp.abstract_params()))
    frozen_shardings = MultiTeacherFrozen(weights=partitioning.replicated(exp.mesh),
                                          base=exp.param_shardings())
  compiled = loop.compile_step(objective, exp.mesh, frozen_shardings)
  initial_state = None            # a fresh run only: a resumed one never loads the teachers here
  if config.multi_teacher.student_init != "random":
    make_state = common.state_maker(objective, compiled)
    initial_state = lambda: make_state(
        frozen.base if frozen.base is not None else
        student_params(config, ids, weights, exp.abstract_params()))
  steps = config.eval.steps_during_training
  trained = common.train(
      exp, objective, loop.Settings.from_config(config, prefetch_threads=config.cache.read_threads),
      workdir=workdir, train_data=cache_lib.training_dataset(caches, config.data.batch_size, config.seed),
      evaluate=common.fd_callback(exp, steps), best_metric=f"fd_{steps[0]}steps", compiled=compiled,
      frozen=frozen,
      initial_state=initial_state,
      meta={"method": "multi_teacher", "weights": dict(zip(ids, map(float, weights)))})
  student = objective.eval_params(trained.state, frozen)
  common.export(student, config, os.path.join(workdir, EXPORT), "ddim", config.eval.final_steps[-1],
                adapters=common.adapters(objective, trained.state, "the student's init "
                                         f"(multi_teacher.student_init={mt.student_init!r})"))
  reference = ids[int(np.argmax(weights))]      # FD (teacher): to the heaviest teacher's samples
  exp.evaluator.set_teacher(teachers.load_checkpoint(
      mt.teachers[reference].checkpoint, exp.abstract_params(), config), config.teacher.sampling_steps)
  rows = common.fd_table(exp, student, config.eval.final_steps)
  evaluated = {i: dict(weight=float(w), checkpoint=mt.teachers[i].checkpoint) for i, w in zip(ids, weights)}
  if mt.evaluate_teachers:     # every teacher at the student's step counts: the comparison
    for teacher_id in ids:
      params = teachers.load_checkpoint(mt.teachers[teacher_id].checkpoint, exp.abstract_params(), config)
      evaluated[teacher_id]["fd"] = {
          r["steps"]: exp.evaluator.evaluate(params, r["steps"], final=True)[0]["fd"] for r in rows}
      logging.info("Teacher %s: FD %s", teacher_id, evaluated[teacher_id]["fd"])
  write_result(workdir, config, rows, evaluated, trained.seconds, caches,
               exp.evaluator.final_num_samples, reference, common.floor_lines(exp))
  return student


def write_result(workdir, config, rows, evaluated, train_seconds, caches, fd_samples, reference,
                 floor_lines):
  """result.json and summary.md: the student's FD per step count next to every teacher's, then
  the student's every metric (FD (teacher): to teacher `reference`) and the floors."""
  if jax.process_index() != 0:
    return
  files.write_json(os.path.join(workdir, "result.json"), dict(
      student=rows, teachers=evaluated, teacher_sampling_steps=config.teacher.sampling_steps,
      fidelity_teacher=reference,
      train_steps=config.train.num_steps, train_seconds=train_seconds,
      cached_examples=caches.latents["num_records"] * caches.noise_draws))
  with_fd = {i: t for i, t in evaluated.items() if "fd" in t}
  table = [[f"teacher {i}", f"{t['weight']:.3g}", *(f"{t['fd'][r['steps']]:.4g}" for r in rows)]
           for i, t in with_fd.items()]
  if with_fd:
    table.append(["mean of the teachers", "", *(
        f"{np.mean([t['fd'][r['steps']] for t in with_fd.values()]):.4g}" for r in rows)])
  table.append(["**student**", "", *(f"**{r['fd']:.4g}**" for r in rows)])
  common.write_summary(
      workdir, f"Multi-teacher distillation: {config.preset}",
      [f"{config.train.num_steps} train steps on {caches.latents['num_records']} samples x "
       f"{caches.noise_draws} cached noise draws, {train_seconds / 60:.1f} min (this invocation); "
       f"FD (DDIM) on {fd_samples} samples vs the held-out split"],
      ["model", "weight", *(f"FD, {r['steps']} steps" for r in rows)], table,
      [f"The student against teacher {reference} (the heaviest):", ""]
      + common.table_lines(["steps", *common.METRIC_HEADER],
                           [[r["steps"], *common.metric_cells(r)] for r in rows])
      + [""] + floor_lines)
