"""The one training loop. It knows nothing about the method: an `Objective` (its contract is
jdistill/objectives/state.py) brings init_state, a pure train_step, eval_params and phase_of, and
`run` owns the mesh shardings, jit (donated state), the data iterator, CLU writing, progress and
ETA, evaluation cadence, early stopping, Orbax checkpoints, resume, and the non-finite-loss stop.
Every training control in config.train reaches `run` through one `Settings`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from jdistill import partitioning
from jdistill.data import pipeline
from jdistill.files import hms
from jdistill.objectives.state import Objective
from jdistill.train import checkpoint as ckpt_lib


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or Inf: the run stops; no update with it reached the state."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """The training controls of one `run`, built once from config.train (`from_config`)."""
  num_steps: int
  seed: int = 0
  log_every: int = 100
  eval_every: int = 0              # 0: evaluate only at the end
  save_every: int = 1000           # 0: save only at the end
  early_stopping_patience: int = 0  # > 0: stop after that many evaluations without a better best
  prefetch_threads: int = 2        # grain threads reading and batching ahead of the step

  @classmethod
  def from_config(cls, config, **overrides):
    t = config.train
    values = dict(num_steps=t.num_steps, seed=config.seed, log_every=t.log_every,
                  eval_every=t.eval_every, save_every=t.save_every,
                  early_stopping_patience=t.early_stopping_patience)
    return cls(**{**values, **overrides})


@dataclasses.dataclass
class CompiledStep:
  """A train step jitted once over the mesh, reused across stages (stage values are traced)."""
  fn: Callable                     # fn(state, batch, rng, frozen, stage, phase); phase static
  state_shardings: Any
  abstract_state: Any
  phase_of: Callable

  def __call__(self, state, batch, rng, frozen, stage, step: int):
    """The step for loop step `step` (the objective's phase of it)."""
    return self.fn(state, batch, rng, frozen, stage, self.phase_of(step))


# XLA:CPU's YNNPACK convolution fusion (on by default in recent jaxlibs) computes convolution
# weight gradients about 2x slower than XLA's own convolution runtime: train steps compiled for
# CPU keep YNNPACK for matmuls only (benchmarks/README.md has the numbers). A user's XLA_FLAGS
# setting of the same option wins.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


@functools.cache
def compiler_options(platform: str):
  """XLA options for train steps on `platform`: None, or CPU_COMPILER_OPTIONS on a CPU whose
  XLA knows them."""
  if platform != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(0.0).compile()
  except Exception:  # noqa: BLE001 - an XLA without this option rejects it
    return None
  return CPU_COMPILER_OPTIONS


def compile_step(objective: Objective, mesh, frozen_shardings=None) -> CompiledStep:
  """The objective's train_step jitted over `mesh`; `frozen_shardings` (a prefix of `frozen`)
  defaults to replicated."""
  boxed = jax.eval_shape(objective.init_state, jax.random.key(0))
  state_shardings = partitioning.shardings_for(boxed, mesh)
  abstract_state = ckpt_lib.abstract_with_shardings(nn.unbox(boxed), state_shardings)
  replicated = partitioning.replicated(mesh)

  def step(state, batch, rng, frozen, stage, phase=None):
    if phase is None:
      return objective.train_step(state, batch, rng, frozen, stage)
    return objective.train_step(state, batch, rng, frozen, stage, phase)

  fn = jax.jit(step,
               in_shardings=(state_shardings, partitioning.batch_sharding(mesh), replicated,
                             frozen_shardings if frozen_shardings is not None else replicated,
                             replicated),
               out_shardings=(state_shardings, replicated), donate_argnums=0, static_argnums=(5,),
               compiler_options=compiler_options(mesh.devices.flat[0].platform))
  return CompiledStep(fn, state_shardings, abstract_state, objective.phase_of)


def init_state(objective, compiled: CompiledStep, rng):
  init = jax.jit(lambda r: nn.unbox(objective.init_state(r)), out_shardings=compiled.state_shardings)
  return init(rng)


def run(objective: Objective, settings: Settings, *, workdir: str, mesh, train_data, writer,
        frozen=None, stage=None, evaluate: Optional[Callable] = None, compiled: CompiledStep = None,
        metric_prefix: str = "", global_step_offset: int = 0, on_best=None, best_metric=None,
        meta: Optional[dict] = None, initial_state: Optional[Callable] = None):
  """Trains `settings.num_steps` steps, checkpointing under `workdir`; resumes from its latest
  checkpoint.

  `evaluate(params, step) -> (scalars, images)` runs every `settings.eval_every` steps and at the
  end. `best_metric` names an eval scalar (lower is better); `on_best(state, scalars, step)` is
  called when it improves. Metrics are written at `global_step_offset + step` with
  `metric_prefix`. `initial_state()` (already sharded) replaces `objective.init_state` for a fresh
  run (a student initialised from its teacher). With `settings.early_stopping_patience` > 0 the
  run ends after that many evaluations without a better `best_metric`. Returns (state,
  last_eval_scalars).
  """
  num_steps, seed, log_every = settings.num_steps, settings.seed, settings.log_every
  eval_every, save_every = settings.eval_every, settings.save_every
  early_stopping_patience = settings.early_stopping_patience
  compiled = compiled or compile_step(objective, mesh)
  manager = ckpt_lib.manager(f"{workdir}/checkpoints")
  batch_sharding = partitioning.batch_sharding(mesh)
  start = 0
  iterator_state = None
  best, evals_since_best = np.inf, 0
  if manager.latest_step() is not None:
    state, saved = ckpt_lib.restore(manager, compiled.abstract_state)
    start, iterator_state = saved["step"], saved["data_iterator"]
    best, evals_since_best = saved.get("best", np.inf), saved.get("evals_since_best", 0)
    if saved.get("stopped_early"):
      start = num_steps
    logging.info("Resumed from %s/checkpoints at step %d.", workdir, saved["step"])
  elif initial_state is not None:
    state = initial_state()
  else:
    state = init_state(objective, compiled, jax.random.key(seed))
  if start < num_steps:
    mark_restart(writer, global_step_offset + start + 1)
  iterator = pipeline.make_iterator(train_data, iterator_state, settings.prefetch_threads)
  base_rng = jax.random.key(seed + 1)

  def checkpoint(step, force=False, stopped_early=False):
    writer.flush()          # the events up to `step` are on disk before a resume would skip them
    saved_meta = dict(meta or {}, step=step, data_iterator=iterator.get_state(), best=float(best),
                      evals_since_best=evals_since_best, stopped_early=stopped_early)
    ckpt_lib.save(manager, step, state, saved_meta, force=force)

  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=log_every)
  pending, last_eval, t_log, step_log = [], {}, time.time(), start
  try:
    for step in range(start, num_steps):
      batch = pipeline.to_global(next(iterator), batch_sharding)
      state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step), frozen, stage, step)
      pending.append(metrics)
      done = step + 1
      report(done)
      if done % log_every == 0 or done == num_steps or (save_every and done % save_every == 0):
        summary = _summarise(pending, done)
        pending = []
        rate = (done - step_log) / max(time.time() - t_log, 1e-9)
        t_log, step_log = time.time(), done
        eta = (num_steps - done) / max(rate, 1e-9)
        logging.info("%sstep %d/%d  %s  %.2f steps/s  ETA %s", metric_prefix, done, num_steps,
                     "  ".join(f"{k}={v:.4g}" for k, v in summary.items()), rate, hms(eta))
        writer.write_scalars(global_step_offset + done,
                             {metric_prefix + k: v for k, v in summary.items()})
      # evaluate first, so a checkpoint of the same step holds that evaluation's best and count
      if evaluate is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
        scalars, images = evaluate(objective.eval_params(state, frozen), done)
        last_eval = scalars
        writer.write_scalars(global_step_offset + done, {metric_prefix + k: v for k, v in scalars.items()})
        if images:
          writer.write_images(global_step_offset + done, {metric_prefix + k: v for k, v in images.items()})
        if best_metric and best_metric not in scalars:
          raise KeyError(f"best_metric {best_metric!r} is not among the evaluation's scalars "
                         f"{sorted(scalars)}")
        if best_metric and scalars[best_metric] < best:
          best, evals_since_best = scalars[best_metric], 0
          if on_best is not None:
            on_best(state, scalars, done)
        else:
          evals_since_best += 1
        if early_stopping_patience and evals_since_best >= early_stopping_patience and done < num_steps:
          logging.info("%sEarly stop at step %d: %s did not improve on %.4g in %d evaluations.",
                       metric_prefix, done, best_metric, best, evals_since_best)
          checkpoint(done, force=True, stopped_early=True)
          break
      if save_every and done % save_every == 0 and done != num_steps:
        checkpoint(done)
    else:
      if start < num_steps:
        checkpoint(num_steps, force=True)
  except BaseException:
    if jax.process_count() == 1:   # an in-flight save completes (other processes may be gone)
      manager.wait_until_finished()
    raise
  manager.wait_until_finished()
  writer.flush()
  return state, last_eval


def mark_restart(writer, step: int):
  """A SessionLog START at `step` in each TensorBoard event file of the CLU `writer`: TensorBoard
  drops the events written earlier at steps >= `step` (a killed run's, which this run rewrites)."""
  import tensorflow as tf
  from tensorflow.python.ops import summary_ops_v2
  writer.flush()
  event = tf.compat.v1.Event(wall_time=time.time(), step=step, session_log=tf.compat.v1.SessionLog(
      status=tf.compat.v1.SessionLog.START)).SerializeToString()
  pending = [writer]
  while pending:            # MultiWriter(AsyncWriter(SummaryWriter), ...) -> the SummaryWriters
    w = pending.pop()
    pending += list(getattr(w, "_writers", ())) + ([w._writer] if hasattr(w, "_writer") else [])
    if isinstance(w, metric_writers.SummaryWriter):
      with w._summary_writer.as_default():
        summary_ops_v2.import_event(tf.constant(event))
      w.flush()


def _summarise(metrics_list, step):
  """Mean of each metric since the last log; raises if any step saw a non-finite loss."""
  stacked = jax.device_get(metrics_list)
  count = lambda key: int(sum(np.sum(m.get(key, 0)) for m in stacked))
  skipped, bad_updates = count("nonfinite"), count("nonfinite_update")
  if skipped:
    what = []
    if skipped > bad_updates:
      what.append(f"the loss was NaN/Inf in {skipped - bad_updates}")
    if bad_updates:
      what.append(f"the update (gradients, new params or optimizer state) was NaN/Inf with a "
                  f"finite loss in {bad_updates}")
    raise NonFiniteLossError(
        f"{' and '.join(what)} of the last {len(stacked)} steps (up to step {step}); those updates "
        "were skipped and the last checkpoint is intact. Lower config.optim.lr, check the data and "
        "config.optim.eps / b1 / b2, or enable config.optim.grad_clip.")
  keys = [k for k in stacked[0] if k not in ("nonfinite", "nonfinite_update")]
  return {k: float(np.mean([m[k] for m in stacked])) for k in keys}

