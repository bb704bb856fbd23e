"""Teacher training driver: the denoising objective through the generic loop, then an FD table
over DDIM step counts, and an exported EMA teacher (`workdir/teacher.msgpack` + `teacher.json`).
With `config.teacher.checkpoint` set, training fine-tunes that teacher instead of starting afresh."""
from __future__ import annotations

import json
import os
import time

import jax
from absl import logging
from etils import epath
from flax import serialization

from jdistill import curriculum as curriculum_lib
from jdistill import files
from jdistill.config import BUNDLED_DIGITS_TEACHER
from jdistill.eval import evaluate as eval_lib
from jdistill.objectives.denoising import DenoisingObjective
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup


def objective_for(exp, num_steps):
  c = exp.config
  return DenoisingObjective(
      denoiser=exp.denoiser, schedule=exp.schedule, optimizer=exp.optimizer(), optim=c.optim,
      num_steps=num_steps,
      data_shape=exp.data_shape, weighting=c.diffusion.loss_weighting,
      min_snr_gamma=c.diffusion.min_snr_gamma,
      label_dropout=c.diffusion.label_dropout, curriculum=curriculum_lib.make_scheduler(c))


def fd_callback(exp, steps_list, prefix="", mode="ddim"):
  """evaluate(params, step) -> ({'fd_<N>steps': ...}, {'samples': grid of the first N}) for the
  loop; `mode` is the sampler ('renoise' for DMD2 generators)."""
  def evaluate(params, step):
    scalars, grid = {}, None
    for n in steps_list:
      result, samples = exp.evaluator.evaluate(params, n, mode)
      scalars.update({f"{k}_{n}steps": v for k, v in result.items()})
      grid = eval_lib.image_grid(samples) if grid is None else grid
    logging.info("%seval at step %d: %s", prefix, step,
                 "  ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    return scalars, {"samples": grid[None]}
  return evaluate


def train(config, workdir: str):
  exp = setup.build(config, workdir)
  num_steps = config.train.num_steps
  objective = objective_for(exp, num_steps)
  compiled = loop.compile_step(objective, exp.mesh)
  initial_state = None
  if config.teacher.checkpoint:        # fine-tune: start from a trained teacher's EMA params
    make_state = jax.jit(objective.new_state, out_shardings=compiled.state_shardings)
    initial_state = lambda: make_state(load_teacher(exp))
  start = time.time()
  state, _ = loop.run(
      objective, workdir=workdir, mesh=exp.mesh, train_data=exp.train_data(), num_steps=num_steps,
      writer=exp.writer, evaluate=fd_callback(exp, config.eval.steps_during_training),
      compiled=compiled, initial_state=initial_state,
      seed=config.seed, log_every=config.train.log_every, eval_every=config.train.eval_every,
      save_every=config.train.save_every, meta={"method": "teacher", "config": config.to_json()})
  train_seconds = time.time() - start
  params = objective.eval_params(state, None)
  export(params, config, workdir)
  rows = fd_table(exp, params, config.eval.final_steps)
  write_summary(workdir, rows, train_seconds, exp)
  return params


def fd_table(exp, params, steps_list):
  rows = []
  for n in steps_list:
    start = time.time()
    result, samples = exp.evaluator.evaluate(params, n, final=True)
    rows.append(dict(steps=n, **result, seconds=time.time() - start))
    eval_lib.save_png(eval_lib.image_grid(samples), os.path.join(exp.workdir, f"samples_{n}steps.png"))
    logging.info("DDIM %4d steps: %s", n, "  ".join(f"{k}={v:.4g}" for k, v in result.items()))
  return rows


def write_summary(workdir, rows, train_seconds, exp):
  if jax.process_index() != 0:
    return
  floor = exp.evaluator.fd_of(_train_examples(exp))
  lines = [f"# Teacher: {exp.config.preset}", "",
           f"training wall time: {train_seconds / 60:.1f} min, {exp.config.train.num_steps} steps", "",
           f"real-data floor (train split vs held-out, {exp.config.eval.num_samples} vs "
           f"{len(exp.test_source.records)}): FD {floor['fd']:.4g}", "",
           ]
  extras = [k for k in rows[0] if k not in ("steps", "fd", "seconds")]
  lines += ["| DDIM steps | FD | " + "".join(f"{k} | " for k in extras) + "seconds |",
            "|---|---|" + "---|" * len(extras) + "---|"]
  for r in rows:
    lines.append(f"| {r['steps']} | {r['fd']:.4g} | " + "".join(f"{r[k]:.4g} | " for k in extras)
                 + f"{r['seconds']:.1f} |")
  text = "\n".join(lines) + "\n"
  files.write_text(os.path.join(workdir, "summary.md"), text)
  logging.info("\n%s", text)


def _train_examples(exp):
  from jdistill.data import pipeline
  return pipeline.all_examples(exp.train_source, exp.config.eval.num_samples)["x"]


def bundled_teacher_path(config):
  """The bundled teacher of the config's data (digits; the toy2d checkerboard) if the config's
  model and diffusion match the ones it was trained with; None otherwise. A mismatch is an error
  naming the field."""
  name = {"digits": "digits", "toy2d": config.data.name}.get(config.data.source)
  path = os.path.join(os.path.dirname(BUNDLED_DIGITS_TEACHER), f"{name}_teacher.msgpack")
  if name is None or not os.path.exists(path):
    return None
  with open(path.replace(".msgpack", ".json")) as f:
    trained = json.load(f)
  for section in ("model", "diffusion"):
    for key, value in trained[section].items():
      mine = config[section][key]
      mine = mine.to_dict() if hasattr(mine, "to_dict") else mine
      if (list(mine) if isinstance(mine, tuple) else mine) != value:
        raise ValueError(f"config.{section}.{key}={mine!r}, but the bundled {name} teacher was "
                         f"trained with {value!r}: set it back, or pass config.teacher.checkpoint")
  return path


def load_exported(path, abstract_params):
  """EMA params from an exported .msgpack, checked against and placed like `abstract_params`."""
  from jdistill.train.checkpoint import CheckpointError, place_like
  if not epath.Path(path).exists():
    raise CheckpointError(f"teacher file {path!r} does not exist")
  params = serialization.msgpack_restore(epath.Path(path).read_bytes())
  return place_like(params, abstract_params, f"teacher {path}")


def load_checkpoint(path, abstract_params):
  """EMA params from an exported .msgpack, or an Orbax run / checkpoints directory."""
  if path.endswith(".msgpack"):
    logging.info("Params: %s", path)
    return load_exported(path, abstract_params)
  logging.info("Params: EMA params of the Orbax checkpoint in %s", path)
  run_checkpoints = os.path.join(path, "checkpoints")
  return ckpt_lib.restore_params(
      run_checkpoints if epath.Path(run_checkpoints).is_dir() else path, abstract_params)


def load_teacher(exp):
  """The teacher's EMA params: config.teacher.checkpoint (an Orbax run dir or a .msgpack), else
  the bundled teacher of the data (digits, toy2d checkerboard); otherwise a clear error saying how
  to train one."""
  c = exp.config
  abstract = exp.abstract_params()
  if c.teacher.checkpoint:
    return load_checkpoint(c.teacher.checkpoint, abstract)
  bundled = bundled_teacher_path(c)
  if bundled:
    logging.info("Teacher: the bundled teacher %s (reproduce with `python -m jdistill.main "
                 "--config=configs/teacher.py:%s --workdir=runs/teacher`)", bundled, c.preset)
    return load_exported(bundled, abstract)
  raise ckpt_lib.CheckpointError(
      "no teacher: set config.teacher.checkpoint to a teacher run directory or .msgpack "
      "(train one with `python -m jdistill.main --config=configs/teacher.py:<preset> --workdir=...`)")


def export(params, config, workdir):
  """Writes the EMA params (msgpack) and the model/diffusion config they need (JSON)."""
  if jax.process_index() != 0:
    return
  files.write_bytes(os.path.join(workdir, "teacher.msgpack"),
                       serialization.to_bytes(jax.device_get(params)))
  files.write_json(os.path.join(workdir, "teacher.json"),
                      {"model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
                       "data": config.data.to_dict(), "train_steps": config.train.num_steps})
