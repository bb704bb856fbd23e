"""Teachers and exported models: find the bundled teacher of a config, load params from an exported
.msgpack or an Orbax run, and export params with the JSON that says how to rebuild and sample them."""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
from absl import logging
from etils import epath
from flax import serialization

from jdistill import files
from jdistill.diffusion import schedules
from jdistill.train import checkpoint as ckpt_lib

BUNDLED_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
BUNDLED_DIGITS_TEACHER = os.path.join(BUNDLED_DIR, "digits_teacher.msgpack")
BUNDLED_DIGITS_FLOW_TEACHER = os.path.join(BUNDLED_DIR, "digits_flow_teacher.msgpack")


def bundled_teacher_path(config):
  """The bundled teacher of the config's data, classes and path (digits, digits_flow,
  digits_cond; the toy2d checkerboard) if the config's model and diffusion match the ones it was
  trained with; None otherwise. A mismatch is an error naming the field."""
  name = {"digits": "digits", "toy2d": config.data.name}.get(config.data.source)
  if name is None:
    return None
  name += "_cond" if config.model.num_classes else ""
  name += "_flow" if schedules.path_of(config.diffusion.schedule) == "flow" else ""
  path = os.path.join(BUNDLED_DIR, f"{name}_teacher.msgpack")
  if not os.path.exists(path):
    return None
  with open(path.replace(".msgpack", ".json")) as f:
    trained = json.load(f)
  for section in ("model", "diffusion"):
    for key, value in trained[section].items():
      mine = config[section][key]
      mine = mine.to_dict() if hasattr(mine, "to_dict") else mine
      if key == "schedule":
        mine, value = schedules.defining_fields(mine), schedules.defining_fields(value)
      if (list(mine) if isinstance(mine, tuple) else mine) != value:
        raise ValueError(f"config.{section}.{key}={mine!r}, but the bundled {name} teacher was "
                         f"trained with {value!r}: set it back, or pass config.teacher.checkpoint")
  return path


def model_card(sections) -> dict:
  """What a model's params mean beyond their shapes, from a config or an exported model's JSON
  (both have `model` and `diffusion` sections): another config must share these to use them."""
  schedule = sections["diffusion"]["schedule"]
  return {"diffusion.path": schedules.path_of(schedule),
          "diffusion.parameterization": sections["diffusion"]["parameterization"],
          "diffusion.schedule": schedules.defining_fields(schedule),
          "model.num_classes": sections["model"]["num_classes"],
          "model.time_input": sections["model"].get("time_input", "logsnr")}


def card_checker(config):
  """check(card, what): a model whose card differs from `config`'s is an error naming the field
  and both values; a model without a card (saved before cards existed) is used with a warning."""
  mine = model_card(config)

  def check(card, what):
    if card is None:
      logging.warning("%s says nothing of its parameterization, schedule or conditioning; "
                      "assuming the config's", what)
      return
    differ = [field for field, value in card.items() if field in mine and mine[field] != value]
    if differ:
      raise ckpt_lib.CheckpointError(
          f"{what} is a model with " + ", ".join(f"{f}={card[f]!r}" for f in differ) + ", but "
          + ", ".join(f"config.{f}={mine[f]!r}" for f in differ) + ": set the config to the "
          "model's values, or use a model made with the config's")
  return check


def load_exported(path, abstract_params, check_card=None):
  """EMA params from an exported .msgpack, checked against and placed like `abstract_params`;
  `check_card` (from card_checker) checks its JSON's model card first."""
  if not epath.Path(path).exists():
    raise ckpt_lib.CheckpointError(f"teacher file {path!r} does not exist")
  if check_card is not None:
    exported = read_export(path)
    check_card(model_card(exported) if exported else None, f"{path}")
  try:
    params = serialization.msgpack_restore(epath.Path(path).read_bytes())
  except Exception as e:  # noqa: BLE001 - msgpack raises several types for a damaged file
    raise ckpt_lib.CheckpointError(f"{path} is not a readable .msgpack (cut short or damaged: "
                                   f"{type(e).__name__}: {e}); export or copy it again") from e
  return ckpt_lib.place_like(params, abstract_params, f"teacher {path}")


def load_checkpoint(path, abstract_params, config):
  """EMA params from an exported .msgpack, or an Orbax run / checkpoints directory, of a model
  that means the same as `config`'s (parameterization, schedule, conditioning)."""
  check = card_checker(config)
  if path.endswith(".msgpack"):
    logging.info("Params: %s", path)
    return load_exported(path, abstract_params, check)
  logging.info("Params: EMA params of the Orbax checkpoint in %s", path)
  run_checkpoints = os.path.join(path, "checkpoints")
  return ckpt_lib.restore_params(
      run_checkpoints if epath.Path(run_checkpoints).is_dir() else path, abstract_params, card=check)


def load_teacher(exp):
  """The teacher's EMA params: config.teacher.checkpoint (an Orbax run dir or a .msgpack), else
  the bundled teacher of the data (digits, toy2d checkerboard); otherwise a clear error saying how
  to train one."""
  c = exp.config
  abstract = exp.abstract_params()
  if c.teacher.checkpoint:
    return load_checkpoint(c.teacher.checkpoint, abstract, c)
  bundled = bundled_teacher_path(c)
  if bundled:
    logging.info("Teacher: the bundled teacher %s (reproduce with `python -m jdistill.main "
                 "--config=configs/teacher.py:%s --workdir=runs/teacher`)", bundled, c.preset)
    return load_exported(bundled, abstract, card_checker(c))
  raise ckpt_lib.CheckpointError(
      "no teacher: set config.teacher.checkpoint to a teacher run directory or .msgpack "
      "(train one with `python -m jdistill.main --config=configs/teacher.py:<preset> --workdir=...`)")


def write_params(path: str, params):
  """`params` (host copies) as msgpack at `path`, from process 0 only."""
  if jax.process_index() == 0:
    files.write_bytes(path, serialization.to_bytes(jax.device_get(params)))


def export(params, config, path: str, sampling: dict, lora: Optional[dict] = None):
  """Writes `params` to `path` (.msgpack) and, next to it (.json), what rebuilds and samples them:
  the model, diffusion and data config sections, the method, `sampling` ({mode, steps}) and, for
  a LoRA student, its `lora` section (its adapters: methods/common.lora_path)."""
  write_params(path, params)
  if jax.process_index() != 0:
    return
  files.write_json(path.replace(".msgpack", ".json"), {
      "model": config.model.to_dict(), "diffusion": config.diffusion.to_dict(),
      "data": config.data.to_dict(), "method": config.method, "sampling": sampling,
      "train_steps": config.train.num_steps, **({"lora": lora} if lora else {})})


def read_export(path: str) -> dict:
  """The JSON next to an exported .msgpack (None if there is none)."""
  return files.read_json(path.replace(".msgpack", ".json"))


def with_export_sections(config, exported: dict, sections=("model", "diffusion", "data")):
  """`config` with an exported model's JSON `sections` laid over its own: what rebuilds it."""
  for section in sections:
    config[section].update(exported.get(section) or {})
  return config


CONVERTED_DIFFUSION = ("schedule", "parameterization", "clip_x")


def adopt_converted_teacher(config):
  """When config.teacher.checkpoint is a converted teacher (jdistill.convert: its JSON names the
  diffusers architecture it was `converted_from`), `config` takes its model section and its
  diffusion schedule, parameterization and clip_x, so student and teacher are its network."""
  path = config.teacher.checkpoint
  exported = read_export(path) if path.endswith(".msgpack") else None
  if not exported or not exported.get("converted_from"):
    return config
  logging.info("Teacher %s is a converted diffusers %s: config.model and config.diffusion.{%s} "
               "are its", path, exported["converted_from"], ",".join(CONVERTED_DIFFUSION))
  config.model.update(exported["model"])
  config.diffusion.update({k: exported["diffusion"][k] for k in CONVERTED_DIFFUSION
                           if k in exported["diffusion"]})
  return config
