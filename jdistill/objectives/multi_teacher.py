"""Multi-teacher distillation from cached predictions: one student regresses the weighted average of
K teachers (e.g. fine-tunes of one base model), read from caches built beforehand
(`python -m jdistill.cache`, jdistill/data/cache.py), so no teacher is in memory while it trains.

A cached example holds (x, t, eps) and every teacher's v_k on z_t = alpha_t x + sigma_t eps; the
teacher's x prediction is x_k = alpha_t z_t - sigma_t v_k. With weights w_k >= 0, sum_k w_k = 1:

    x_target = sum_k w_k x_k,      loss = E[ lambda(logsnr_t) d(x_hat(z_t), x_target) ]

d: squared error ('mse') or the Huber loss of the weighted error ('huber'); lambda from
diffusion/losses.py (v_mse by default). Per-teacher losses E[lambda d(x_hat, x_k)] are logged too.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdistill import files
from jdistill.config import ConfigError
from jdistill.data import cache as cache_lib
from jdistill.diffusion.losses import weighted_x_loss
from jdistill.diffusion.parameterization import from_v
from jdistill.diffusion.parameterization import forward_process
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup
from jdistill.train import state as state_lib
from jdistill.train import teacher as teacher_lib


def teacher_weights(teachers):
  """(ids, sorted; weights w_k normalised to sum 1) from config.multi_teacher.teachers."""
  ids = tuple(sorted(teachers))
  raw = np.array([float(teachers[i]["weight"]) for i in ids])
  for teacher_id, weight in zip(ids, raw):
    if not weight >= 0:
      raise ConfigError(f"config.multi_teacher.teachers.{teacher_id}.weight: must be >= 0, got {weight}")
  if not ids or raw.sum() <= 0:
    raise ConfigError("config.multi_teacher.teachers: all weights are 0; at least one must be > 0")
  return ids, raw / raw.sum()


@dataclasses.dataclass(frozen=True)
class MultiTeacherObjective:
  denoiser: Any
  schedule: Any
  optimizer: Any
  optim: Any                      # config.optim (lr schedule, EMA decay and warmup)
  num_steps: int
  data_shape: tuple
  teacher_ids: tuple              # the order of batch['teacher_v'][:, k] and frozen['weights'][k]
  weighting: str = "v_mse"
  min_snr_gamma: float = 5.0
  huber_delta: Optional[float] = None   # None: mse

  def init_state(self, rng, frozen=None):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"])

  def new_state(self, params):
    return state_lib.create(params, self.optimizer)

  def targets(self, batch, weights):
    """(z_t, logsnr_t, x_k of every teacher (B, K, ...), x_target = sum_k w_k x_k) of a cached batch."""
    x, eps = batch["x"].astype(jnp.float32), batch["eps"].astype(jnp.float32)
    z_t, logsnr = forward_process(x, batch["t"], eps, self.schedule)
    teacher_x = jax.vmap(lambda v: from_v(v, z_t, logsnr).x0, in_axes=1, out_axes=1)(
        batch["teacher_v"].astype(jnp.float32))
    return z_t, logsnr, teacher_x, jnp.einsum("k,bk...->b...", weights, teacher_x)

  def distance(self, x_hat, x_target, logsnr):
    """Per example lambda(logsnr) d(x_hat, x_target)."""
    return weighted_x_loss(x_hat, x_target, logsnr, self.weighting, self.min_snr_gamma,
                           self.huber_delta)

  def train_step(self, state, batch, rng, frozen, stage):
    del stage
    z_t, logsnr, teacher_x, x_target = self.targets(batch, frozen["weights"])
    label = batch["label"] if self.denoiser.num_classes else None

    def loss_fn(params):
      pred = self.denoiser.predict(params, z_t, logsnr, label, train=True, rng=rng)
      return jnp.mean(self.distance(pred.x0, x_target, logsnr)), pred.x0

    (loss, x_hat), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    lr = state_lib.learning_rate(self.optim, state.step, self.num_steps)
    new_state = state_lib.apply_gradients(state, grads, self.optimizer, self.optim.ema_decay, lr,
                                          self.optim.ema_warmup)
    metrics = {"loss": loss, "grad_norm": state_lib.global_norm(grads), "lr": lr}
    for k, teacher_id in enumerate(self.teacher_ids):
      metrics[f"loss_{teacher_id}"] = jnp.mean(self.distance(x_hat, teacher_x[:, k], logsnr))
    new_state, metrics["nonfinite"] = state_lib.keep_if_finite(new_state, state, loss)
    return new_state, metrics

  def eval_params(self, state, frozen=None):
    return state.ema_params


def make_objective(exp, teacher_ids):
  c, mt = exp.config, exp.config.multi_teacher
  return MultiTeacherObjective(
      exp.denoiser, exp.schedule, exp.optimizer(), c.optim, c.train.num_steps, exp.data_shape,
      tuple(teacher_ids), mt.loss_weighting, c.diffusion.min_snr_gamma,
      mt.huber_delta if mt.loss == "huber" else None)


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
      params=teacher_lib.load_checkpoint(checkpoint, exp.abstract_params()), schedule=exp.schedule,
      schedule_config=config.diffusion.schedule.to_dict(), buckets=c.buckets, base_seed=c.base_seed,
      noise_draws=c.noise_draws, checkpoint=checkpoint, dtype=c.dtype, batch_size=c.build_batch_size,
      skip_existing=c.skip_existing, mesh=exp.mesh)


def open_caches(config, workdir, teacher_ids):
  """The checked caches of `teacher_ids`, built with this config's buckets, seeds, draws, dtype."""
  c = config.cache
  return cache_lib.open_training_caches(
      cache_dir(config, workdir), teacher_ids, buckets=c.buckets, base_seed=c.base_seed,
      noise_draws=c.noise_draws, schedule_config=config.diffusion.schedule.to_dict(), dtype=c.dtype)


def student_params(config, teacher_ids, weights, abstract_params):
  """Where a fresh student starts (multi_teacher.student_init): '' the heaviest teacher (ties: the
  first id); 'average' the teachers' parameters averaged with their weights w_k (a model soup:
  fine-tunes of one base model share its basin, so the soup starts near every teacher and nearer
  to none); a checkpoint path; or None for 'random'."""
  spec = config.multi_teacher.student_init
  teachers = config.multi_teacher.teachers
  load = lambda path: teacher_lib.load_checkpoint(path, abstract_params)
  if spec == "random":
    return None
  if spec == "average":
    trees = [load(teachers[i].checkpoint) for i in teacher_ids]
    return jax.tree.map(lambda *leaves: sum(float(w) * leaf for w, leaf in zip(weights, leaves)), *trees)
  return load(spec or teachers[teacher_ids[int(np.argmax(weights))]].checkpoint)


# ----------------------------------------------------------------------------- the driver

def train(config, workdir: str):
  exp = setup.build(config, workdir)
  mt = config.multi_teacher
  ids, weights = teacher_weights(mt.teachers)
  caches = open_caches(config, workdir, ids)
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
  compiled = loop.compile_step(objective, exp.mesh)
  initial_state = None            # a fresh run only: a resumed one never loads the teachers here
  if config.multi_teacher.student_init != "random":
    make_state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)
    initial_state = lambda: make_state(student_params(config, ids, weights, exp.abstract_params()))
  start = time.time()
  state, _ = loop.run(
      objective, workdir=workdir, mesh=exp.mesh,
      train_data=cache_lib.training_dataset(caches, config.data.batch_size, config.seed),
      num_steps=config.train.num_steps, writer=exp.writer,
      frozen={"weights": jnp.asarray(weights, jnp.float32)},
      evaluate=teacher_lib.fd_callback(exp, config.eval.steps_during_training), compiled=compiled,
      seed=config.seed, log_every=config.train.log_every, eval_every=config.train.eval_every,
      save_every=config.train.save_every, initial_state=initial_state,
      prefetch_threads=config.cache.read_threads,
      meta={"method": "multi_teacher", "weights": dict(zip(ids, map(float, weights)))})
  train_seconds = time.time() - start
  student = objective.eval_params(state)
  rows = teacher_lib.fd_table(exp, student, config.eval.final_steps)
  teachers = {i: dict(weight=float(w), checkpoint=mt.teachers[i].checkpoint) for i, w in zip(ids, weights)}
  if mt.evaluate_teachers:     # every teacher at the student's step counts: the comparison
    for teacher_id in ids:
      params = teacher_lib.load_checkpoint(mt.teachers[teacher_id].checkpoint, exp.abstract_params())
      teachers[teacher_id]["fd"] = {
          r["steps"]: exp.evaluator.evaluate(params, r["steps"], final=True)[0]["fd"] for r in rows}
      logging.info("Teacher %s: FD %s", teacher_id, teachers[teacher_id]["fd"])
  write_result(workdir, config, rows, teachers, train_seconds, caches, exp.evaluator.final_num_samples)
  return student


def write_result(workdir, config, rows, teachers, train_seconds, caches, fd_samples):
  """result.json and summary.md: the student's FD per step count next to every teacher's."""
  if jax.process_index() != 0:
    return
  steps = config.teacher.sampling_steps
  files.write_json(os.path.join(workdir, "result.json"), dict(
      student=rows, teachers=teachers, teacher_sampling_steps=steps,
      train_steps=config.train.num_steps, train_seconds=train_seconds,
      cached_examples=caches.latents["num_records"] * caches.noise_draws))
  lines = [f"# Multi-teacher distillation: {config.preset}", "",
           f"{config.train.num_steps} train steps on {caches.latents['num_records']} samples x "
           f"{caches.noise_draws} cached noise draws, {train_seconds / 60:.1f} min (this invocation); "
           f"FD (DDIM) on {fd_samples} samples vs the held-out split", "",
           "| model | weight | " + " | ".join(f"FD, {r['steps']} steps" for r in rows) + " |",
           "|---|---|" + "---|" * len(rows)]
  evaluated = {i: t for i, t in teachers.items() if "fd" in t}
  lines += [f"| teacher {i} | {t['weight']:.3g} | " + " | ".join(f"{t['fd'][r['steps']]:.4g}" for r in rows)
            + " |" for i, t in evaluated.items()]
  if evaluated:
    lines.append("| mean of the teachers | | " + " | ".join(
        f"{np.mean([t['fd'][r['steps']] for t in evaluated.values()]):.4g}" for r in rows) + " |")
  lines.append("| **student** | | " + " | ".join(f"**{r['fd']:.4g}**" for r in rows) + " |")
  text = "\n".join(lines) + "\n"
  files.write_text(os.path.join(workdir, "summary.md"), text)
  logging.info("\n%s", text)
