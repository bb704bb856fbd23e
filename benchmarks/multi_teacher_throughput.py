"""Multi-teacher training throughput: the student's train step fed from the caches (the real
grain pipeline reading array_record shards) vs the same step with every teacher run live.

    python benchmarks/multi_teacher_throughput.py --workdir=runs/mt [--steps=60] [--repeats=3]

Needs the caches of configs/multi_teacher.py (`python -m jdistill.cache ...`, see README). Both
paths run the same compiled student step; the live path adds one jitted pass of each teacher on
(t, eps) drawn for the batch. Prints samples/s of each and their ratio (medians of `repeats`,
alternating).
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/mt", "the multi-teacher run directory holding cache/")
flags.DEFINE_string("config", "configs/multi_teacher.py", "the multi-teacher config file")
flags.DEFINE_integer("steps", 60, "timed train steps per repeat")
flags.DEFINE_integer("repeats", 3, "alternating repeats of each path (median)")


def main(_):
  import importlib.util
  import tempfile

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jdistill.data import cache as cache_lib
  from jdistill.data import pipeline
  from jdistill.methods import multi_teacher as mt_lib
  from jdistill.objectives.multi_teacher import MultiTeacherFrozen, teacher_weights
  from jdistill.diffusion.parameterization import forward_process
  from jdistill.train import setup
  from jdistill import partitioning
  from jdistill.train import teachers as teacher_lib

  spec = importlib.util.spec_from_file_location("mt_config", FLAGS.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  exp = setup.build(config, tempfile.mkdtemp(), evaluator=False, record_config=False)
  ids, weights = teacher_weights(config.multi_teacher.teachers)
  caches = mt_lib.open_caches(config, FLAGS.workdir, ids)
  teachers = [teacher_lib.load_checkpoint(config.multi_teacher.teachers[i].checkpoint,
                                          exp.abstract_params()) for i in ids]
  objective = mt_lib.make_objective(exp, ids)
  from jdistill.train import loop
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)(teachers[0])
  frozen = MultiTeacherFrozen(weights=jnp.asarray(weights, jnp.float32))
  sharding = partitioning.batch_sharding(exp.mesh)
  batch_size = config.data.batch_size

  cached = pipeline.make_iterator(
      cache_lib.training_dataset(caches, batch_size, config.seed), None, config.cache.read_threads)
  data = pipeline.make_iterator(exp.train_data())

  @jax.jit
  def live_targets(teacher_params, x, rng):
    """What a cache record holds, computed on the fly: t, eps and every teacher's v."""
    rng_t, rng_eps = jax.random.split(rng)
    t = jax.random.uniform(rng_t, (x.shape[0],))
    eps = jax.random.normal(rng_eps, x.shape)
    z_t, logsnr = forward_process(x, t, eps, exp.schedule)
    v = jnp.stack([exp.denoiser.predict(p, z_t, logsnr).v for p in teacher_params], axis=1)
    return {"x": x, "t": t, "eps": eps, "teacher_v": v}

  def from_cache(i):
    batch = next(cached)
    return pipeline.to_global({k: batch[k] for k in ("x", "t", "eps", "teacher_v")}, sharding)

  def live(i):
    x = pipeline.to_global({"x": next(data)["x"]}, sharding)["x"]
    return live_targets(teachers, x, jax.random.key(i))

  def timed(make_batch):
    nonlocal state
    metrics = None
    for i in range(3):                                   # warm-up (compiles)
      state, metrics = compiled.fn(state, make_batch(i), jax.random.key(i), frozen, None)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(FLAGS.steps):
      state, metrics = compiled.fn(state, make_batch(i), jax.random.key(i), frozen, None)
    jax.block_until_ready(metrics)
    return FLAGS.steps * batch_size / (time.perf_counter() - start)

  rates = {"cache": [], "live": []}
  for _ in range(FLAGS.repeats):
    rates["cache"].append(timed(from_cache))
    rates["live"].append(timed(live))
  cache_rate, live_rate = (float(np.median(rates[k])) for k in ("cache", "live"))
  print(f"\nmulti-teacher student training, {len(ids)} teachers, batch {batch_size}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, medians of {FLAGS.repeats} x {FLAGS.steps} steps")
  print("| path | samples/s |\n|---|---|")
  print(f"| from the caches | {cache_rate:.0f} |\n| teachers live | {live_rate:.0f} |")
  print(f"cache / live: {cache_rate / live_rate:.2f}x")


if __name__ == "__main__":
  app.run(main)
