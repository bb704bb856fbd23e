"""Convert a diffusers UNet2DModel or DiTTransformer2DModel and its scheduler into an exported
jdistill teacher.

  python -m jdistill.convert --diffusers=DIR --scheduler=DIR_OR_JSON --out=runs/x/teacher.msgpack
      [--dtype=float32] [--preset=cifar10]

DIR holds config.json and diffusion_pytorch_model.safetensors (or shards listed in
diffusion_pytorch_model.safetensors.index.json). Every tensor maps to one param of
jdistill/models/diffusers_unet.py (conv OIHW -> HWIO, linear (out, in) -> (in, out)); a missing,
unexpected or mis-shaped tensor is an error naming it. A DiTTransformer2DModel becomes jdistill's
own DiT (models/dit_diffusers.py). The JSON next to the .msgpack holds the model section
(model.name 'diffusers_unet' with the diffusers config verbatim under model.diffusers, or 'dit')
and the diffusion section read from the scheduler config: DDPMScheduler / DDIMScheduler
('linear' / 'scaled_linear' betas; the network takes its DDPM timestep, time_input
'ddpm_timestep') or FlowMatchEulerDiscreteScheduler (the 'flow' schedule with its shift, velocity
'v', time_input 't1000'). Give `--config.teacher.checkpoint=OUT` to a distillation run: its
model and diffusion sections become the teacher's (train/teachers.py).
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import serialization
from safetensors.numpy import load_file

from jdistill import files
from jdistill.config import base_config
from jdistill.diffusion.schedules import unshift_time
from jdistill.errors import ConfigError
from jdistill.models import dit_diffusers, diffusers_unet

WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
PREDICTIONS = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


class ConversionError(ValueError):
  """A diffusers folder or scheduler config that does not convert (names the key or field)."""


def read_config(path: str, name: str) -> dict:
  """The JSON at `path`, or at `path`/`name` when `path` is a folder."""
  path = os.path.join(path, name) if os.path.isdir(path) else path
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  with open(path) as f:
    return json.load(f)


def read_state_dict(folder: str) -> dict:
  """{key: numpy array} of a diffusers model folder's safetensors (one file or shards)."""
  single, index = os.path.join(folder, WEIGHTS), os.path.join(folder, WEIGHTS + ".index.json")
  if os.path.isfile(single):
    shards = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      shards = [os.path.join(folder, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise ConversionError(f"{folder}: neither {WEIGHTS} nor {WEIGHTS}.index.json")
  state = {}
  for shard in shards:
    state.update(load_file(shard))
  for key in list(state):           # diffusers' pre-0.14 attention names
    parts = key.split(".")
    if len(parts) > 2 and parts[-2] in LEGACY_ATTENTION and "attentions" in parts:
      state[".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])] = state.pop(key)
  return state


def diffusers_key(path) -> str:
  """The diffusers state dict key of a Flax param path: ('down_blocks_0', 'resnets_1', 'conv1',
  'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  modules = [re.sub(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_"
                    r"(\d+)$", r"\1.\2", name) for name in path[:-1]]
  return ".".join(modules + ["bias" if path[-1] == "bias" else "weight"])


def to_flax(array, leaf: str):
  """A torch tensor in Flax's layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if leaf == "kernel":
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def convert_params(state: dict, module, example_shape, dtype=None) -> dict:
  """The Flax params of `module` from a diffusers state dict; every missing, unexpected or
  mis-shaped key is an error naming it. `dtype`: cast every param (default: keep the file's)."""
  label = jnp.zeros((1,), jnp.int32) if module.spec.num_class_embeds else None
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(example_shape),
                                                jnp.ones((1,)), label))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(abstract, is_leaf=lambda x: hasattr(x, "names"))
  params, wanted, problems = {}, set(), []
  for path, leaf in leaves:
    names = tuple(p.key for p in path)
    key = diffusers_key(names)
    wanted.add(key)
    shape = tuple(getattr(leaf, "value", leaf).shape)
    if key not in state:
      problems.append(f"missing key {key!r} (Flax shape {shape})")
      continue
    array = to_flax(state[key], names[-1])
    if array.shape != shape:
      problems.append(f"key {key!r} has shape {tuple(state[key].shape)}; the config.json's model "
                      f"needs {shape} (in Flax's layout)")
      continue
    node = params
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.ascontiguousarray(array if dtype is None else array.astype(dtype))
  problems += [f"unexpected key {key!r}" for key in sorted(set(state) - wanted)]
  if problems:
    raise ConversionError(f"{len(problems)} state dict key(s) do not match the UNet2DModel of "
                          "config.json: " + "; ".join(problems))
  return params


def check_field(config: dict, field: str, ok: bool, why: str):
  if not ok:
    raise ConversionError(f"scheduler config: {field}={config.get(field)!r} is not supported "
                          f"({why})")


def diffusion_of_scheduler(scheduler: dict):
  """(diffusion section, model.time_input) of a diffusers scheduler config."""
  get = lambda field, default=None: scheduler.get(field, default)
  kind = get("_class_name")
  check_field(scheduler, "_class_name", kind in VP_SCHEDULERS + (FLOW_SCHEDULER,),
              f"choose one of {VP_SCHEDULERS + (FLOW_SCHEDULER,)}")
  timesteps = get("num_train_timesteps", 1000)
  if kind == FLOW_SCHEDULER:
    check_field(scheduler, "num_train_timesteps", timesteps == 1000,
                "the flow network's time is 1000 tau (time_input 't1000')")
    for field in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas",
                  "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling"):
      check_field(scheduler, field, not get(field, False), "only the plain shifted Euler schedule")
    check_field(scheduler, "shift_terminal", get("shift_terminal") is None,
                "only the plain shifted Euler schedule")
    schedule = dict(name="flow", shift=float(get("shift", 1.0)))
    return dict(schedule=schedule, parameterization="v", loss_weighting="flow_v_mse",
                clip_x=False), "t1000"
  check_field(scheduler, "beta_schedule", get("beta_schedule", "linear")
              in ("linear", "scaled_linear"), "choose 'linear' or 'scaled_linear'")
  check_field(scheduler, "trained_betas", get("trained_betas") is None,
              "only the named beta schedules")
  check_field(scheduler, "prediction_type", get("prediction_type", "epsilon") in PREDICTIONS,
              f"choose one of {tuple(PREDICTIONS)}")
  check_field(scheduler, "thresholding", not get("thresholding", False),
              "jdistill clips x to [-1, 1] (clip_sample) or not at all")
  check_field(scheduler, "clip_sample_range", not get("clip_sample", True)
              or get("clip_sample_range", 1.0) == 1.0, "jdistill clips x to [-1, 1]")
  check_field(scheduler, "variance_type", get("variance_type", "fixed_small")
              not in ("learned", "learned_range"), "the network would output its variance too")
  schedule = dict(name=get("beta_schedule", "linear"), num_train_timesteps=timesteps,
                  beta_start=get("beta_start", 1e-4), beta_end=get("beta_end", 0.02),
                  zero_terminal_snr=bool(get("rescale_betas_zero_snr", False)))
  parameterization = PREDICTIONS[get("prediction_type", "epsilon")]
  return dict(schedule=schedule, parameterization=parameterization,
              loss_weighting=f"{parameterization}_mse", clip_x=bool(get("clip_sample", True))
              ), "ddpm_timestep"


def ddim_grid(timesteps, num_train_timesteps: int):
  """jdistill's time grid (for diffusion.sampling.sample's `grid`) of a diffusers DDIM loop over
  `timesteps` (DDIMScheduler.timesteps): timestep k is t = (k + 1) / T, and the last step lands on
  t = 0, x itself (DDIM's set_alpha_to_one)."""
  inner = (np.sort(np.asarray(timesteps, np.float64)) + 1.0) / num_train_timesteps
  return np.concatenate([[0.0], inner]).astype(np.float32)


def euler_grid(sigmas, shift: float):
  """jdistill's time grid of a diffusers flow-matching Euler loop over `sigmas` (its tau, ending
  at 0: FlowMatchEulerDiscreteScheduler.sigmas): t = the unshifted tau."""
  tau = np.sort(np.asarray(sigmas, np.float64))
  return np.asarray(unshift_time(tau, shift), np.float32)


def example_shape(unet_config: dict):
  """A (1, H, W, C) input for the config's network (H, W: its sample_size)."""
  size = unet_config.get("sample_size") or 2 ** (len(unet_config["block_out_channels"]) - 1)
  height, width = (size, size) if isinstance(size, int) else size
  return (1, height, width, unet_config.get("in_channels", 3))


def dit_model(dit_config: dict, state: dict, dtype: str):
  """(jdistill model section, params) of a DiTTransformer2DModel: jdistill's own DiT."""
  try:
    model = dit_diffusers.model_fields(dit_config)
    params = dit_diffusers.dit_params_from_diffusers(state, dit_config)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  return model, jax.tree.map(lambda a: a.astype(dtype), params)


def unet_model(unet_config: dict, state: dict, dtype: str, cast: bool):
  """(jdistill model section, params) of a UNet2DModel: its Flax mirror, 'diffusers_unet'."""
  module = diffusers_unet.from_config(unet_config, jnp.dtype(dtype))
  params = convert_params(state, module, example_shape(unet_config), dtype if cast else None)
  model = dict(name="diffusers_unet", diffusers=unet_config,
               num_classes=unet_config.get("num_class_embeds") or 0)
  return model, params


ARCHITECTURES = ("UNet2DModel", "DiTTransformer2DModel")


def convert(diffusers_dir: str, scheduler: str, out: str, dtype: str = "", preset: str = ""):
  """Writes `out` (.msgpack) and its JSON; returns the JSON's contents."""
  if not out.endswith(".msgpack"):
    raise ConversionError(f"--out={out}: must name a .msgpack file")
  model_config = read_config(diffusers_dir, "config.json")
  architecture = model_config.get("_class_name", "UNet2DModel")
  if architecture not in ARCHITECTURES:
    raise ConversionError(f"{diffusers_dir}/config.json: _class_name={architecture!r} is not "
                          f"supported; choose one of {ARCHITECTURES}")
  diffusion, time_input = diffusion_of_scheduler(read_config(scheduler, "scheduler_config.json"))
  state = read_state_dict(diffusers_dir)
  weight_dtype = dtype or ("bfloat16" if any(a.dtype.name == "bfloat16" for a in state.values())
                           else "float32")
  if architecture == "UNet2DModel":
    model, params = unet_model(model_config, state, weight_dtype, bool(dtype))
  else:
    model, params = dit_model(model_config, state, weight_dtype)
  model.update(time_input=time_input, dtype=weight_dtype)
  exported = {"model": model, "diffusion": diffusion, "converted_from": architecture,
              "data": base_config(preset).data.to_dict() if preset else {},
              "method": "teacher", "sampling": {"mode": "ddim", "steps": 50}, "train_steps": 0}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  files.write_bytes(out, serialization.msgpack_serialize(params))
  files.write_json(out.replace(".msgpack", ".json"), exported)
  return exported


def define_flags():
  flags.DEFINE_string("diffusers", None, "A diffusers UNet2DModel or DiTTransformer2DModel folder "
                      "(config.json, safetensors).")
  flags.DEFINE_string("scheduler", None, "Its scheduler: a folder with scheduler_config.json, or the JSON.")
  flags.DEFINE_string("out", None, "The teacher's .msgpack (its .json is written next to it).")
  flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "Cast the weights (default: keep them).")
  flags.DEFINE_string("preset", "", "A config preset whose data section the JSON records (e.g. "
                      "cifar10), so that `jdistill.sample --checkpoint=OUT` finds the data.")


def main(argv):
  del argv
  for name in ("diffusers", "scheduler", "out"):
    if not getattr(flags.FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    exported = convert(flags.FLAGS.diffusers, flags.FLAGS.scheduler, flags.FLAGS.out,
                       flags.FLAGS.dtype, flags.FLAGS.preset)
  except (ConversionError, ConfigError) as e:
    raise app.UsageError(str(e)) from e
  print(f"wrote {flags.FLAGS.out}: {exported['model']['name']} ({exported['model']['dtype']}), "
        f"{exported['diffusion']['schedule']}, parameterization "
        f"{exported['diffusion']['parameterization']}, time_input {exported['model']['time_input']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
