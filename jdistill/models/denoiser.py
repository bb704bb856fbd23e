"""Denoiser: the one call every objective and sampler uses.

    denoiser.predict(params, z_t, logsnr, cond) -> Prediction(x0, eps, v)

Any Flax Linen module plugs in if its `__call__(z, time, label=None, train=False)` returns the
raw output (data channels, or twice that for the 'both' parameterization); see docs/architecture.md.
A module that a method extends also takes `steps=` (TDM-unify), `interval=` (flow maps) or
`guidance=` (guidance-conditioned students), each None when unused.
The Denoiser hands the module the state and time it was trained on: z in its `path`'s coordinates
(diffusion/parameterization.py) and `time_input` of the noise level: 'logsnr' (jdistill's own
networks), the flow path's tau ('t') or 1000 tau ('t1000', SD3's and Flux's timesteps), or the
continuous DDPM timestep of a discrete schedule ('ddpm_timestep', diffusers' UNets).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdistill.diffusion import parameterization as param_lib
from jdistill.diffusion.parameterization import Prediction
from jdistill.diffusion.schedules import ddpm_table_logsnr, ddpm_timestep, flow_time
from jdistill.errors import ConfigError, check_choice

MODELS = ("unet", "dit", "mlp", "diffusers_unet")
TIME_INPUTS = ("logsnr", "t", "t1000", "ddpm_timestep")
# what a rematerialised network pass keeps for its backward pass (config.train.remat): nothing
# ('full': it is recomputed), or the outputs of its matmuls and convolutions ('dots')
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def network_time(logsnr, time_input: str, ddpm_logsnr: tuple = ()):
  """What a network takes as its time: logSNR itself, the flow path's tau (x 1000), or the DDPM
  timestep of the table `ddpm_logsnr` (schedules.ddpm_table_logsnr)."""
  if time_input == "logsnr":
    return logsnr
  if time_input == "ddpm_timestep":
    return ddpm_timestep(logsnr, ddpm_logsnr)
  return flow_time(logsnr) * (1000.0 if time_input == "t1000" else 1.0)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  module: nn.Module
  parameterization: str           # 'eps' | 'x' | 'v' | 'both'
  num_classes: int = 0            # > 0: label `num_classes` is the null (unconditional) class
  path: str = "vp"                # 'vp' | 'flow': the coordinates of the z it sees and its 'v'
  time_input: str = "logsnr"      # what it takes as time (TIME_INPUTS)
  ddpm_logsnr: tuple = dataclasses.field(default=(), repr=False)   # 'ddpm_timestep': the
                                  # logSNR of each DDPM timestep (schedules.ddpm_table_logsnr)
  remat: str = "none"             # every pass under jax.checkpoint with REMAT_POLICIES[remat]

  def apply_module(self, params, z, logsnr, cond, **kwargs):
    """The module on the state and time in its own terms (its raw output)."""
    apply = lambda p, state, time, c: self.module.apply({"params": p}, state, time, c, **kwargs)
    if self.remat != "none":
      apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])
    return apply(params, param_lib.path_state(z, logsnr, self.path),
                 network_time(logsnr, self.time_input, self.ddpm_logsnr), cond)

  def to_prediction(self, output, z, logsnr) -> Prediction:
    return param_lib.from_model_output(self.parameterization, output, z, logsnr, self.path)

  def init(self, rng, example_z, step_conditioned: bool = False, flow_map: bool = False,
           guided: bool = False):
    """Params; `step_conditioned` adds the (zero) step-count embedding of TDM-unify generators,
    `flow_map` the (zero) interval embedding of flow maps (MeanFlow), `guided` the (zero) guidance
    embedding of guidance-conditioned students."""
    batch = example_z.shape[0]
    label = jnp.zeros((batch,), jnp.int32) if self.num_classes else None
    extra = {"steps": jnp.ones((batch,), jnp.int32)} if step_conditioned else {}
    if flow_map:
      extra["interval"] = jnp.zeros((batch,))
    if guided:
      extra["guidance"] = jnp.zeros((batch,))
    return self.module.init({"params": rng, "dropout": rng}, example_z, jnp.zeros((batch,)), label,
                            **extra)

  def predict(self, params, z, logsnr, cond: Optional[jnp.ndarray] = None, *,
              train: bool = False, rng: Optional[jax.Array] = None,
              steps: Optional[jnp.ndarray] = None,
              interval: Optional[jnp.ndarray] = None,
              guidance: Optional[jnp.ndarray] = None) -> Prediction:
    """`steps`: the sampler's step count K per example; only step-conditioned params (those
    holding a `step_embedding`) read it, so samplers can always pass it. `interval`: the flow-time
    interval h = t - r of a flow map's step (per example); only flow-map params (those holding an
    `interval_embedding`) read it, and without it they predict at h = 0 (the velocity).
    `guidance`: the CFG weight w a guidance-conditioned network is told (scalar or per example;
    without it, w = 0); other params refuse it (they guide with two passes: `predict_guided`)."""
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    extra = {"steps": steps} if (steps is not None and is_step_conditioned(params)) else {}
    if is_flow_map(params):
      extra["interval"] = jnp.zeros(logsnr.shape) if interval is None else interval
    if is_guidance_conditioned(params):
      extra["guidance"] = jnp.broadcast_to(0.0 if guidance is None else guidance, logsnr.shape)
    elif guidance is not None:
      raise ValueError("a guidance weight was given to a network without a guidance embedding; "
                       "guide it with two passes (predict_guided)")
    output = self.apply_module(params, z, logsnr, cond, train=train, rngs=rngs, **extra)
    return self.to_prediction(output, z, logsnr)

  def predict_guided(self, params, z, logsnr, cond, guidance, steps=None) -> Prediction:
    """Classifier-free guidance, two passes: (1 + w) pred(z | c) - w pred(z | null); w a scalar or
    one per example. A guidance-conditioned student is refused: its one pass already guides."""
    if is_guidance_conditioned(params):
      raise ValueError("classifier-free guidance applied twice: this network is guidance-"
                       "conditioned (one pass at its w); tell it w (predict_with_guidance)")
    if self.num_classes == 0 or cond is None:
      return self.predict(params, z, logsnr, None, steps=steps)
    null = jnp.full_like(cond, self.num_classes)
    both = self.predict(params, jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                        jnp.concatenate([cond, null]),
                        steps=None if steps is None else jnp.concatenate([steps, steps]))
    conditional = jax.tree.map(lambda a: a[: z.shape[0]], both)
    unconditional = jax.tree.map(lambda a: a[z.shape[0]:], both)
    w = param_lib.broadcast_to_data(jnp.broadcast_to(guidance, logsnr.shape), z)
    return param_lib.combine([(1.0 + w, conditional), (-w, unconditional)])

  def predict_with_guidance(self, params, z, logsnr, cond, guidance, *, steps=None,
                            interval=None) -> Prediction:
    """The prediction at CFG weight w (`guidance`: a Python float, or per example): a guidance-
    conditioned network is told w (one pass); others are guided with two passes, or, at a static
    w = 0, are asked once."""
    if is_guidance_conditioned(params):
      return self.predict(params, z, logsnr, cond, steps=steps, interval=interval,
                          guidance=guidance)
    if is_unguided(guidance):
      return self.predict(params, z, logsnr, cond, steps=steps, interval=interval)
    return self.predict_guided(params, z, logsnr, cond, guidance, steps)

  def predict_with_features(self, params, z, logsnr, cond=None, layers=("bottleneck",), *,
                            train: bool = False, rng: Optional[jax.Array] = None):
    """(Prediction, [activations of `layers`]) from one forward pass. U-Net layer names:
    'down_<level>', 'bottleneck', 'up_<level>'; DiT: 'block_<i>', 'bottleneck' (its middle
    block)."""
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    output, state = self.apply_module(params, z, logsnr, cond, train=train, rngs=rngs,
                                      capture_features=True, mutable=["intermediates"])
    captured = state["intermediates"]
    missing = [name for name in layers if name not in captured]
    if missing:
      raise ValueError(f"config.features.layers: {missing} not captured; have {sorted(captured)}")
    return self.to_prediction(output, z, logsnr), [captured[name][0] for name in layers]


def is_step_conditioned(params) -> bool:
  return "step_embedding" in params


def is_flow_map(params) -> bool:
  return "interval_embedding" in params


def is_guidance_conditioned(params) -> bool:
  return "guidance_embedding" in params


def is_unguided(guidance) -> bool:
  """Whether a CFG weight is a static 0 (a Python number): the model is asked once, unguided. An
  array (one w per example, maybe traced) always guides."""
  return isinstance(guidance, (int, float)) and guidance == 0


def with_zero_embedding(denoiser: "Denoiser", params, example_z, **which):
  """`params` (e.g. the teacher's) plus the zero-initialised embedding(s) `which` names
  (step_conditioned, flow_map, guided: Denoiser.init's flags): the same function, ready to be told
  its step count, interval or guidance weight."""
  fresh = jax.eval_shape(lambda: denoiser.init(jax.random.key(0), example_z, **which)["params"])
  zeros = lambda leaf: jnp.zeros(getattr(leaf, "value", leaf).shape, getattr(leaf, "value", leaf).dtype)
  added = {name: jax.tree.map(zeros, fresh[name], is_leaf=lambda x: isinstance(x, nn.Partitioned))
           for name in fresh if name not in params}
  return {**params, **added}


def with_interval_embedding(denoiser: "Denoiser", params, example_z):
  """A flow map that is the teacher's velocity at every interval (MeanFlow's start)."""
  return with_zero_embedding(denoiser, params, example_z, flow_map=True)


def with_step_embedding(denoiser: "Denoiser", params, example_z):
  """A step-conditioned generator that is the teacher at every step count (TDM-unify's start)."""
  return with_zero_embedding(denoiser, params, example_z, step_conditioned=True)


def with_guidance_embedding(denoiser: "Denoiser", params, example_z):
  """A guidance-conditioned student that is the conditional teacher at every w (guided
  distillation's start)."""
  return with_zero_embedding(denoiser, params, example_z, guided=True)


def make_denoiser(model_config, data_shape, parameterization: str, path: str = "vp",
                  schedule=None, remat: str = "none") -> Denoiser:
  """Builds the Denoiser from `config.model` for data of shape `data_shape` (no batch dim), a
  model of `path` (schedules.path_of the diffusion schedule); `schedule` (config.diffusion.schedule)
  is needed by a network that takes its DDPM timestep (time_input 'ddpm_timestep'); `remat`
  (config.train.remat) rematerialises every pass."""
  from jdistill.models import diffusers_unet
  from jdistill.models.dit import DiT
  from jdistill.models.mlp import MLPDenoiser
  from jdistill.models.unet import UNet
  check_choice("model.name", model_config.name, MODELS)
  dtype = jnp.dtype(model_config.dtype)
  out = param_lib.output_channels(parameterization, data_shape[-1])
  time_input = model_config.get("time_input", "logsnr")
  if model_config.name == "unet":
    module = UNet(out_channels=out, channels=model_config.channels,
                  channel_mult=tuple(model_config.channel_mult),
                  num_res_blocks=model_config.num_res_blocks,
                  attention_resolutions=tuple(model_config.attention_resolutions),
                  num_heads=model_config.num_heads, dropout=model_config.dropout,
                  num_classes=model_config.num_classes, norm_groups=model_config.norm_groups,
                  dtype=dtype)
  elif model_config.name == "dit":
    check_dit(model_config, *data_shape[:-1])
    module = DiT(out_channels=out, hidden=model_config.channels, patch_size=model_config.patch_size,
                 depth=model_config.depth, num_heads=model_config.num_heads,
                 dropout=model_config.dropout, num_classes=model_config.num_classes,
                 time_is_logsnr=time_input == "logsnr", dtype=dtype)
  elif model_config.name == "mlp":
    module = MLPDenoiser(out_channels=out, hidden=model_config.channels,
                         depth=model_config.num_res_blocks, num_classes=model_config.num_classes,
                         dtype=dtype)
  else:
    diffusers = model_config.get("diffusers")
    diffusers = diffusers.to_dict() if hasattr(diffusers, "to_dict") else diffusers
    if not diffusers:
      raise ConfigError("config.model.diffusers: a 'diffusers_unet' needs the UNet2DModel's "
                        "config.json here; convert the model with jdistill.convert")
    for field, want in (("in_channels", data_shape[-1]), ("out_channels", out)):
      if diffusers.get(field, 3) != want:
        raise ConfigError(f"config.model.diffusers.{field}={diffusers.get(field, 3)}, but data "
                          f"of shape {tuple(data_shape)} with parameterization "
                          f"{parameterization!r} needs {want}")
    module = diffusers_unet.from_config(diffusers, dtype)
  ddpm_logsnr = ()
  if time_input == "ddpm_timestep":
    if schedule is None or schedule["name"] not in ("linear", "scaled_linear"):
      raise ConfigError("config.model.time_input='ddpm_timestep' needs a DDPM schedule "
                        "('linear', 'scaled_linear') in config.diffusion.schedule")
    ddpm_logsnr = ddpm_table_logsnr(schedule)
  check_choice("train.remat", remat, tuple(REMAT_POLICIES))
  return Denoiser(module, parameterization, model_config.num_classes, path, time_input, ddpm_logsnr,
                  remat)


def check_dit(model_config, *image_sides: int):
  """A DiT's shape: heads split its hidden size (`channels`), a multiple of 4 (the 2-D position
  embedding), and the patch size divides the image sides (0: not known yet)."""
  def check(ok, field, message):
    if not ok:
      raise ConfigError(f"config.model.{field}: {message}")
  hidden, heads, patch = model_config.channels, model_config.num_heads, model_config.patch_size
  check(patch >= 1, "patch_size", f"must be >= 1, got {patch}")
  check(model_config.depth >= 1, "depth", f"must be >= 1, got {model_config.depth}")
  check(heads >= 1 and hidden % heads == 0, "num_heads",
        f"{heads} heads do not split the DiT's hidden size (model.channels) {hidden}")
  check(hidden % 4 == 0, "channels", f"the DiT's hidden size must be a multiple of 4 (its 2-D "
        f"sin-cos position embedding), got {hidden}")
  for side in image_sides:
    check(side % patch == 0, "patch_size", f"{patch} does not divide the image side {side}")
