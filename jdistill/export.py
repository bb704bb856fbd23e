"""Export a jdistill student (or teacher) as a diffusers folder that samples as it does here.

  python -m jdistill.export --checkpoint=runs/pd/student.msgpack --out=DIR [--guidance=W]

DIR gets the model (`unet/` a UNet2DModel, `transformer/` a DiTTransformer2DModel: config.json
and diffusion_pytorch_model.safetensors) and `scheduler/` set for the model's step count N
(`jdistill_steps`, `jdistill_guidance` record N and w); `sample_in_diffusers` is its loop.
- jdistill's own U-Net ('unet', the VP path): diffusers' blocks, a learned time table and
  DDIMScheduler betas read off jdistill's schedule at T = N m >= 1000 timesteps laid along the
  model's grid (uniform or nested), so `scheduler.set_timesteps(N)` steps exactly that grid.
- a converted UNet2DModel ('diffusers_unet') or a DiT that takes the scheduler's timestep: the
  inverse of jdistill.convert's mapping with its DDPM scheduler (N trailing steps are t_i = i / N),
  or, on the flow path, FlowMatchEulerDiscreteScheduler with its shift and noise levels.
- a step-count or guidance embedding folds into the time embedding at N and w (`--guidance`).
- a LoRA student also gets `<model>_lora/`: its adapters as a PEFT LoRA over its base.
"""
from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from flax import serialization
from safetensors.numpy import save_file

from jdistill import files
from jdistill.convert import WEIGHTS, ConversionError, diffusers_key
from jdistill.diffusion.schedules import flow_logsnr, unshift_time

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
  """The diffusers scheduler config of a model that takes a DDPM timestep or 1000 tau, set for its
  step count N: DDIMScheduler over its DDPM betas (N trailing steps are t_i = i / N; a nested grid
  is recorded as `jdistill_timesteps`, which DDIM's own loop cannot step), or
  FlowMatchEulerDiscreteScheduler with its shift, whose grid is `jdistill_sigmas`, for
  `set_timesteps(sigmas=...)`: the model's noise levels unshifted (from 0.99995, not 1: jdistill
  clips logSNR to [-20, 20])."""
  diffusion, sampling = exported["diffusion"], exported.get("sampling", {})
  schedule, (_, grid) = diffusion["schedule"], sampling_grid(exported)
  if schedule["name"] == "flow":
    if diffusion.get("clip_x", True):
      raise ConversionError("diffusion.clip_x=True: FlowMatchEulerDiscreteScheduler does not clip "
                            "x_hat to [-1, 1] as this model samples; export one sampled without it")
    shift = float(schedule.get("shift", 1.0))
    logsnr = np.asarray(flow_logsnr(grid[:0:-1], shift), np.float64)     # clipped to [-20, 20]
    tau = 1.0 / (1.0 + np.exp(0.5 * logsnr))
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
            "shift": shift, "jdistill_sigmas": [float(t) for t in unshift_time(tau, shift)]}
  if schedule["name"] not in ("linear", "scaled_linear"):
    raise ConversionError(f"diffusion.schedule.name={schedule['name']!r} has no diffusers "
                          "scheduler here ('linear', 'scaled_linear' or 'flow')")
  config = ddim_config(schedule["num_train_timesteps"], diffusion,
                       beta_schedule=schedule["name"], beta_start=schedule["beta_start"],
                       beta_end=schedule["beta_end"],
                       rescale_betas_zero_snr=bool(schedule.get("zero_terminal_snr", False)))
  if sampling.get("grid") is not None:
    config["jdistill_timesteps"] = [float(t * config["num_train_timesteps"] - 1.0)
                                    for t in grid[:0:-1]]
  return config


def ddim_config(num_train_timesteps: int, diffusion: dict, **schedule) -> dict:
  """DDIMScheduler, deterministic with 'trailing' spacing: N steps over T timesteps are k = T - 1,
  T - 1 - T / N, ..., T / N - 1, and the last lands on x itself (set_alpha_to_one)."""
  if diffusion["parameterization"] not in PREDICTION_TYPES:
    raise ConversionError(f"diffusion.parameterization={diffusion['parameterization']!r} has no "
                          f"diffusers prediction_type; one of {tuple(PREDICTION_TYPES)}")
  return {"_class_name": "DDIMScheduler", "num_train_timesteps": num_train_timesteps, **schedule,
          "prediction_type": PREDICTION_TYPES[diffusion["parameterization"]],
          "clip_sample": bool(diffusion.get("clip_x", True)), "clip_sample_range": 1.0,
          "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing"}


def sampling_grid(exported: dict):
  """(N, the time grid t_0 = 0 < ... < t_N = 1 it samples on: its own, or uniform)."""
  sampling = exported.get("sampling", {})
  steps = int(sampling.get("steps", 1))
  return steps, np.asarray(sampling.get("grid") or np.arange(steps + 1) / steps, np.float64)


def grid_table(exported: dict):
  """(num_train_timesteps T, the time t_k of each timestep k < T) of the exported scheduler of a
  jdistill U-Net that samples in N steps on its grid t_0 = 0 < ... < t_N = 1: T = N m >= 1000, and
  t_k runs linearly between grid points, t_{i m - 1} = t_i, so DDIM's N trailing timesteps are
  exactly the grid (uniform or not)."""
  steps, grid = sampling_grid(exported)
  per_step = -(-1000 // steps)
  total = steps * per_step
  return total, np.interp(np.arange(1, total + 1) / per_step, np.arange(steps + 1), grid)


FOLDED = ("step_embedding", "guidance_embedding")


def data_shape(exported: dict):
  """(H, W, C) of the data the exported model was trained on (its data section)."""
  from ml_collections import ConfigDict
  from jdistill.data import sources
  return sources.load_split(ConfigDict(exported["data"]), "test").data_shape


def fold_embeddings(params, steps: int, guidance: float):
  """(params without the step-count and guidance embeddings a method adds, what those add to the
  time embedding at the export's N = `steps` and w = `guidance`): a constant, for the time MLP's
  output bias. A flow map's interval embedding changes within a sample: no diffusers form."""
  import jax.numpy as jnp
  from jdistill.models.unet import MAX_STEPS, zero_fourier_features
  if "interval_embedding" in params:
    raise ConversionError("a flow map (its interval_embedding) has no diffusers model form")
  shift = 0.0
  if "step_embedding" in params:           # a step-conditioned generator told N
    shift = shift + np.asarray(params["step_embedding"]["embedding"], np.float32)[min(steps, MAX_STEPS)]
  if "guidance_embedding" in params:       # a guidance-conditioned student told w
    kernel = np.asarray(params["guidance_embedding"]["kernel"], np.float32)
    features = np.asarray(zero_fourier_features(jnp.full((1,), guidance), kernel.shape[-1]))
    shift = shift + (features @ kernel)[0] + np.asarray(params["guidance_embedding"]["bias"])
  return {k: v for k, v in params.items() if k not in FOLDED}, shift


def native_unet(params, exported: dict, shift, data_shape):
  """(UNet2DModel config, state dict, scheduler config) of jdistill's own U-Net (model.name
  'unet', the VP path), exactly as it samples here: its time embedding a learned table at the
  scheduler's timesteps (models/unet_diffusers.py), its DDIMScheduler's betas those of jdistill's
  schedule there."""
  import jax.numpy as jnp
  from ml_collections import ConfigDict
  from jdistill.diffusion.parameterization import output_channels
  from jdistill.diffusion.schedules import make_schedule, path_of
  from jdistill.models import unet_diffusers
  from jdistill.models.unet import logsnr_embedding
  model, diffusion = ConfigDict(exported["model"]), exported["diffusion"]
  if path_of(diffusion["schedule"]) != "vp":
    raise ConversionError("diffusion.schedule.name='flow': a jdistill U-Net exports on the VP "
                          "path only (diffusers' flow scheduler hands the network float "
                          "timesteps, its learned time table takes integers)")
  total, times = grid_table(exported)
  logsnr = make_schedule(ConfigDict(diffusion["schedule"]))(jnp.asarray(times, jnp.float32))
  table = np.asarray(logsnr_embedding(logsnr, model.channels))
  cumprod = 1.0 / (1.0 + np.exp(-np.asarray(logsnr, np.float64)))        # alpha_k^2
  betas = 1.0 - cumprod / np.concatenate([[1.0], cumprod[:-1]])
  try:
    config = unet_diffusers.diffusers_config(
        model, data_shape, output_channels(diffusion["parameterization"], data_shape[-1]), total)
    state = unet_diffusers.diffusers_state_dict(params, model, data_shape[0], table, shift)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  scheduler = ddim_config(total, diffusion, trained_betas=[float(b) for b in betas])
  return config, state, scheduler


def dit(params, exported: dict, shift, data_shape):
  """(DiTTransformer2DModel config, state dict, scheduler config) of a DiT whose time is a DDPM
  timestep or 1000 tau (a converted one, or one trained with that model.time_input)."""
  from ml_collections import ConfigDict
  from jdistill.models import dit_diffusers
  time_input = exported["model"].get("time_input", "logsnr")
  if time_input not in ("ddpm_timestep", "t1000"):
    raise ConversionError(f"model.time_input={time_input!r}: diffusers' DiT embeds the scheduler's "
                          "timestep sinusoidally, so only a DiT that takes it ('ddpm_timestep' "
                          "with a DDPM schedule, 't1000' on the flow path) exports")
  config = dit_diffusers.diffusers_config(ConfigDict(exported["model"]), data_shape)
  return config, dit_diffusers.diffusers_state_dict(params, config, shift), scheduler_config(exported)


def peft_adapter(adapters, lora: dict, params, modules_of):
  """(adapter_config.json, adapter_model.safetensors state) of jdistill's LoRA adapters
  ({'A/B/kernel': {a, b}}) over the model whose params are `params`; `modules_of(names)` gives
  the diffusers modules of a kernel's param path."""
  from jdistill.models.lora import path_name, peft_factors
  kernels = {path_name(p): np.shape(leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
  rank, alpha = int(lora["rank"]), float(lora["alpha"])
  state, targets, rank_pattern, alpha_pattern = {}, [], {}, {}
  for name, adapter in adapters.items():
    names = name.split("/")
    modules = modules_of(names)
    if not modules:
      raise ConversionError(f"a LoRA adapter on {name}, which has no place in the diffusers model")
    lora_a, lora_b = peft_factors(np.asarray(adapter["a"], np.float32),
                                  np.asarray(adapter["b"], np.float32), kernels[name],
                                  out_projection=names[-2] == "out")
    for module in modules:
      state[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
      state[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
      targets.append(module)
      if lora_a.shape[0] != rank:        # per-head attention factors: same scale alpha / r
        rank_pattern[module] = int(lora_a.shape[0])
        alpha_pattern[module] = alpha * lora_a.shape[0] / rank
  config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "task_type": None, "inference_mode": True,
            "base_model_name_or_path": None, "modules_to_save": None}
  return config, state


def module_mapper(exported: dict, diffusers_config: dict):
  """names -> the diffusers modules of a param of the exported model, whose diffusers config is
  `diffusers_config` (for its LoRA adapters)."""
  from ml_collections import ConfigDict
  from jdistill.models import dit_diffusers, unet_diffusers
  model = ConfigDict(exported["model"])
  if model.name == "diffusers_unet":
    return lambda names: [diffusers_key(tuple(names)).rsplit(".", 1)[0]]
  if model.name == "unet":
    module_of = unet_diffusers.module_mapper(model, diffusers_config["sample_size"])
    return lambda names: [m for m in [module_of(names)] if m]
  return dit_diffusers.module_mapper(diffusers_config)


MODEL_FOLDERS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}


def export(checkpoint: str, out: str, guidance: Optional[float] = None) -> dict:
  """Writes the diffusers folder `out` for the exported jdistill model `checkpoint` (.msgpack with
  its JSON); returns the scheduler config. `guidance`: the w a guidance-conditioned student is
  exported at (default: the w it was exported with)."""
  exported = files.read_json(checkpoint.replace(".msgpack", ".json"))
  if exported is None:
    raise ConversionError(f"{checkpoint}: no exported model JSON next to it")
  with open(checkpoint, "rb") as f:
    params = serialization.msgpack_restore(f.read())
  sampling, name = exported.get("sampling", {}), exported["model"].get("name")
  steps, mode = int(sampling.get("steps", 1)), sampling.get("mode", "ddim")
  if guidance is None:
    guidance = float(sampling.get("guidance", 0.0))
  elif "guidance_embedding" not in params:
    raise ConversionError(f"--guidance={guidance:g}: {checkpoint} is not guidance-conditioned (no "
                          "guidance_embedding); a CFG model's w is the sampling loop's")
  if mode not in ("ddim", "euler") and steps > 1:
    raise ConversionError(f"sampling.mode={mode!r} with {steps} steps: diffusers' DDIM and Euler "
                          "schedulers step deterministically; export a 1-step or a DDIM sampler")
  params, shift = fold_embeddings(params, steps, guidance)
  if name == "diffusers_unet":
    config = {"_class_name": "UNet2DModel", **exported["model"]["diffusers"]}
    state, scheduler = state_dict(params), scheduler_config(exported)
    state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + shift
  elif name == "unet":
    config, state, scheduler = native_unet(params, exported, shift, data_shape(exported))
  elif name == "dit":
    config, state, scheduler = dit(params, exported, shift, data_shape(exported))
  else:
    raise ConversionError(f"{checkpoint}: model.name={name!r}; a U-Net ('unet', "
                          "'diffusers_unet') or a DiT ('dit') exports")
  scheduler.update(jdistill_steps=steps, jdistill_guidance=guidance)
  model_folder = MODEL_FOLDERS[config["_class_name"]]
  for folder in (model_folder, "scheduler"):
    os.makedirs(os.path.join(out, folder), exist_ok=True)
  save_file(state, os.path.join(out, model_folder, WEIGHTS))
  files.write_json(os.path.join(out, model_folder, "config.json"), config)
  files.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler)
  if exported.get("lora"):                        # a LoRA student: its adapters, for PEFT
    adapters_path = checkpoint.replace(".msgpack", ".lora.msgpack")
    if not os.path.isfile(adapters_path):
      raise ConversionError(f"{checkpoint} is a LoRA student, but its adapters {adapters_path} "
                            "are missing")
    with open(adapters_path, "rb") as f:
      adapters = serialization.msgpack_restore(f.read())
    peft_config, peft_state = peft_adapter(adapters, exported["lora"], params,
                                           module_mapper(exported, config))
    os.makedirs(os.path.join(out, model_folder + "_lora"), exist_ok=True)
    save_file(peft_state, os.path.join(out, model_folder + "_lora", "adapter_model.safetensors"))
    files.write_json(os.path.join(out, model_folder + "_lora", "adapter_config.json"), peft_config)
    scheduler["jdistill_lora_base"] = exported["lora"].get("base", "")
    files.write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler)
  return scheduler


def diffusers_class(model_folder: str):
  """The diffusers model class of an exported model folder (its config.json's _class_name)."""
  import diffusers
  return getattr(diffusers, files.read_json(os.path.join(model_folder, "config.json"))["_class_name"])


def sample_in_diffusers(folder: str, noise: np.ndarray, labels=None, batch_size: int = 500):
  """The exported folder sampled in PyTorch by its diffusers scheduler's own loop
  (`jdistill_steps` steps; DDIM with eta 0 and the clipped x's eps, as DDIM runs here) from
  `noise` (NHWC, float32); NHWC samples. Needs torch and diffusers (the test extras), which
  jdistill itself does not."""
  import diffusers
  import torch
  model_folder = next(f for f in MODEL_FOLDERS.values() if os.path.isdir(os.path.join(folder, f)))
  model = diffusers_class(os.path.join(folder, model_folder)).from_pretrained(
      os.path.join(folder, model_folder)).eval()
  scheduler_json = files.read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
  scheduler = getattr(diffusers, scheduler_json["_class_name"]).from_pretrained(
      os.path.join(folder, "scheduler"))
  ddim = {"eta": 0.0, "use_clipped_model_output": True} if "DDIM" in scheduler_json["_class_name"] else {}
  noise, out = np.array(noise, np.float32), []         # a writable copy for torch.from_numpy
  for start in range(0, len(noise), batch_size):
    if "jdistill_sigmas" in scheduler_json:
      scheduler.set_timesteps(sigmas=scheduler_json["jdistill_sigmas"])
    else:
      scheduler.set_timesteps(scheduler_json["jdistill_steps"])
    z = torch.from_numpy(noise[start:start + batch_size].transpose(0, 3, 1, 2))
    label = None if labels is None else torch.as_tensor(np.asarray(labels[start:start + batch_size]))
    if label is None and model_folder == "transformer":     # diffusers' DiT always takes one
      label = torch.zeros(z.shape[0], dtype=torch.long)
    with torch.no_grad():
      for step in scheduler.timesteps:
        output = model(z, step.expand(z.shape[0]), class_labels=label).sample
        z = scheduler.step(output, step, z, **ddim).prev_sample
    out.append(z.numpy().transpose(0, 2, 3, 1))
  return np.concatenate(out)


def main(argv):
  del argv
  if not flags.FLAGS.checkpoint or not flags.FLAGS.out:
    raise app.UsageError("--checkpoint and --out are required")
  try:
    scheduler = export(flags.FLAGS.checkpoint, flags.FLAGS.out, flags.FLAGS.guidance)
  except ConversionError as e:
    raise app.UsageError(str(e)) from e
  print(f"wrote {flags.FLAGS.out}/unet and {flags.FLAGS.out}/scheduler ({scheduler['_class_name']}, "
        f"{scheduler['jdistill_steps']} steps)")


if __name__ == "__main__":
  flags.DEFINE_string("checkpoint", None, "An exported jdistill model (.msgpack with its .json).")
  flags.DEFINE_string("out", None, "The diffusers folder to write (unet/, scheduler/).")
  flags.DEFINE_float("guidance", None, "The w a guidance-conditioned student is exported at "
                     "(default: its exported w).")
  app.run(main)
