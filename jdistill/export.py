"""Export a jdistill model of a diffusers architecture back to a diffusers folder.

  python -m jdistill.export --checkpoint=runs/pd/student.msgpack --out=DIR

DIR gets `unet/` (config.json and diffusion_pytorch_model.safetensors, the inverse of
jdistill.convert's mapping) and `scheduler/` (scheduler_config.json) set for the model's step
count: a DDPM-schedule model gets DDIMScheduler with 'trailing' timestep spacing, whose N steps
are jdistill's uniform grid t_i = i / N (timestep t T - 1) ending on x itself (set_alpha_to_one);
a flow model gets FlowMatchEulerDiscreteScheduler with its shift. A model exported on a
non-uniform grid (progressive distillation's nested grids) records its timesteps under
`jdistill_timesteps` in the scheduler config, for `scheduler.set_timesteps(timesteps=...)`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import app, flags
from flax import serialization
from safetensors.numpy import save_file

from jdistill import files
from jdistill.convert import WEIGHTS, ConversionError, diffusers_key
from jdistill.diffusion.schedules import shift_time

PREDICTION_TYPES = {"eps": "epsilon", "x": "sample", "v": "v_prediction"}


def to_torch_layout(array, leaf: str):
  """A Flax param in torch's layout: conv HWIO -> OIHW, linear (in, out) -> (out, in)."""
  if leaf == "kernel":
    return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
  return array


def state_dict(params) -> dict:
  """{diffusers key: numpy array} of a 'diffusers_unet' model's params (bfloat16 as float32)."""
  state = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(p.key for p in path)
    array = np.asarray(leaf)
    array = array.astype(np.float32) if array.dtype.name == "bfloat16" else array   # safetensors.numpy
    state[diffusers_key(names)] = np.ascontiguousarray(to_torch_layout(array, names[-1]))
  return state


def scheduler_config(exported: dict) -> dict:
  """A diffusers scheduler config that samples the model as jdistill does (its step count)."""
  diffusion, sampling = exported["diffusion"], exported.get("sampling", {})
  schedule = diffusion["schedule"]
  if schedule["name"] == "flow":
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
              "shift": float(schedule.get("shift", 1.0))}
    times = lambda t: 1000.0 * shift_time(np.asarray(t, np.float64), config["shift"])
  elif schedule["name"] in ("linear", "scaled_linear"):
    if diffusion["parameterization"] not in PREDICTION_TYPES:
      raise ConversionError(f"diffusion.parameterization={diffusion['parameterization']!r} has no "
                            f"diffusers prediction_type; one of {tuple(PREDICTION_TYPES)}")
    config = {"_class_name": "DDIMScheduler", "num_train_timesteps": schedule["num_train_timesteps"],
              "beta_schedule": schedule["name"], "beta_start": schedule["beta_start"],
              "beta_end": schedule["beta_end"],
              "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr", False)),
              "prediction_type": PREDICTION_TYPES[diffusion["parameterization"]],
              "clip_sample": bool(diffusion.get("clip_x", True)), "clip_sample_range": 1.0,
              "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}
    times = lambda t: np.asarray(t, np.float64) * config["num_train_timesteps"] - 1.0
  else:
    raise ConversionError(f"diffusion.schedule.name={schedule['name']!r} has no diffusers "
                          "scheduler here ('linear', 'scaled_linear' or 'flow')")
  config["jdistill_steps"] = int(sampling.get("steps", 1))
  if sampling.get("grid") is not None:           # the model's own (non-uniform) grid
    config["jdistill_timesteps"] = [float(v) for v in times(sampling["grid"][:0:-1])]
  return config


def export(checkpoint: str, out: str) -> dict:
  """Writes the diffusers folder `out` for the exported jdistill model `checkpoint` (.msgpack with
  its JSON); returns the scheduler config."""
  exported = files.read_json(checkpoint.replace(".msgpack", ".json"))
  if exported is None:
    raise ConversionError(f"{checkpoint}: no exported model JSON next to it")
  if exported["model"].get("name") != "diffusers_unet":
    raise ConversionError(f"{checkpoint}: model.name={exported['model'].get('name')!r}; only a "
                          "diffusers UNet2DModel ('diffusers_unet', from jdistill.convert) exports")
  with open(checkpoint, "rb") as f:
    params = serialization.msgpack_restore(f.read())
  scheduler = scheduler_config(exported)
  for folder in ("unet", "scheduler"):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
  save_file(state_dict(params), os.path.join(out, "unet", WEIGHTS))
  files.write_json(os.path.join(out, "unet", "config.json"),
                   {"_class_name": "UNet2DModel", **exported["model"]["diffusers"]})
  files.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler)
  return scheduler


def main(argv):
  del argv
  if not flags.FLAGS.checkpoint or not flags.FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  try:
    scheduler = export(flags.FLAGS.checkpoint, flags.FLAGS.out)
  except ConversionError as e:
    raise app.UsageError(str(e)) from e
  print(f"wrote {flags.FLAGS.out}/unet and {flags.FLAGS.out}/scheduler ({scheduler['_class_name']}, "
        f"{scheduler['jdistill_steps']} steps)")


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint", None, "An exported jdistill model (.msgpack with its .json).")
  flags.DEFINE_string("out", None, "The diffusers folder to write (unet/, scheduler/).")
  app.run(main)
