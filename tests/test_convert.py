"""Converting a diffusers UNet2DModel teacher (jdistill.convert): output and sampling parity with
PyTorch on tiny random-weight models, and errors that name the bad key or field."""
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import serialization
from diffusers import (DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler,
                       UNet2DModel)
from safetensors.numpy import load_file, save_file

from jdistill import config as config_lib
from jdistill import convert
from jdistill.diffusion import sampling
from jdistill.diffusion.schedules import alpha_sigma, make_schedule
from jdistill.errors import ConfigError
from jdistill.models import diffusers_unet
from jdistill.models.denoiser import make_denoiser
from jdistill.train import setup, teachers

SHAPE = (8, 8, 3)
TIMESTEPS = (0, 1, 250, 600, 999)


def tiny_unet(path, seed=0, **options):
  """A random-weight UNet2DModel with attention down, up and in the middle, saved to `path`."""
  torch.manual_seed(seed)
  model = UNet2DModel(**{**dict(
      sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
      layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
      up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8),
      **options}).eval()
  with torch.no_grad():             # norms and biases off their init, so every param matters
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def save_scheduler(scheduler, path):
  scheduler.save_config(path)
  return str(path / "scheduler_config.json")


def torch_output(model, x_nhwc, timesteps, labels=None):
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2)),
                torch.as_tensor(np.asarray(timesteps, np.float32)),
                class_labels=None if labels is None else torch.as_tensor(np.asarray(labels)))
  return out.sample.numpy().transpose(0, 2, 3, 1)


def converted_denoiser(out, shape=SHAPE):
  """(denoiser, params, schedule, config) of a converted teacher, loaded the way a run loads it."""
  config = teachers.with_export_sections(config_lib.base_config(), teachers.read_export(out),
                                         ("model", "diffusion"))
  denoiser = make_denoiser(config.model, shape, config.diffusion.parameterization,
                           "flow" if config.diffusion.schedule.name == "flow" else "vp",
                           config.diffusion.schedule)
  boxed = jax.eval_shape(lambda: denoiser.init(jax.random.key(0), jnp.zeros((1, *shape))))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          nn.unbox(boxed["params"]))
  params = teachers.load_exported(out, abstract, teachers.card_checker(config))
  return denoiser, params, make_schedule(config.diffusion.schedule), config


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
  """A class-conditional eps-prediction UNet2DModel and its converted teacher."""
  root = tmp_path_factory.mktemp("conditional")
  model = tiny_unet(root / "unet", num_class_embeds=10)
  scheduler = save_scheduler(DDPMScheduler(num_train_timesteps=1000), root)
  out = str(root / "teacher.msgpack")
  convert.convert(str(root / "unet"), scheduler, out)
  return model, root, out


def test_converted_network_matches_pytorch(conditional):
  model, root, out = conditional
  exported = teachers.read_export(out)
  assert exported["model"]["name"] == "diffusers_unet"
  assert exported["model"]["diffusers"]["num_class_embeds"] == 10
  assert exported["model"]["time_input"] == "ddpm_timestep"
  assert exported["diffusion"]["parameterization"] == "eps"
  assert exported["diffusion"]["schedule"]["name"] == "linear"
  module = diffusers_unet.from_config(exported["model"]["diffusers"])
  with open(out, "rb") as f:
    params = serialization.msgpack_restore(f.read())
  rng = np.random.RandomState(0)
  x = rng.randn(16 * len(TIMESTEPS), *SHAPE).astype(np.float32)   # 16 inputs x 5 noise levels
  t = np.repeat(np.asarray(TIMESTEPS, np.float32) + np.asarray([0, 0, 0.5, 0, 0]), 16)
  labels = rng.randint(0, 10, len(x))
  ours = jax.jit(module.apply)({"params": params}, x, t, labels)
  error = np.abs(np.asarray(ours) - torch_output(model, x, t, labels)).max()
  assert error <= 1e-4, error


def test_fourier_scale_shift_network_matches_pytorch(tmp_path):
  """Fourier time (the output divided by it), scale-shift resnets (the mid attention then has
  no norm), centred input, legacy attention key names."""
  model = tiny_unet(tmp_path / "unet", seed=5, time_embedding_type="fourier",
                    resnet_time_scale_shift="scale_shift", center_input_sample=True)
  weights = str(tmp_path / "unet" / convert.WEIGHTS)
  state = load_file(weights)
  legacy = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  for key in [k for k in state if "attentions" in k]:
    new = key
    for name, old in legacy.items():
      new = new.replace(name, old)
    state[new] = state.pop(key)
  save_file(state, weights)
  module = diffusers_unet.from_config(dict(model.config))
  params = convert.convert_params(convert.read_state_dict(str(tmp_path / "unet")), module,
                                  (1, *SHAPE))
  x = np.random.RandomState(5).rand(12, *SHAPE).astype(np.float32)
  t = np.repeat(np.asarray([0.01, 1.0, 50.0], np.float32), 4)
  ours = jax.jit(module.apply)({"params": params}, x, t)
  theirs = torch_output(model, x, t)
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


def test_denoiser_eps_is_the_pytorch_output_at_the_matching_timestep(conditional):
  model, _, out = conditional
  denoiser, params, schedule, config = converted_denoiser(out)
  rng = np.random.RandomState(1)
  x = rng.randn(2 * len(TIMESTEPS), *SHAPE).astype(np.float32)
  k = np.repeat(np.asarray(TIMESTEPS), 2)
  labels = rng.randint(0, 10, len(x))
  logsnr = schedule(jnp.asarray((k + 1) / 1000.0))      # table index k + 1: alphas_cumprod[k]
  pred = jax.jit(denoiser.predict)(params, jnp.asarray(x), logsnr, jnp.asarray(labels))
  error = np.abs(np.asarray(pred.eps) - torch_output(model, x, k, labels)).max()
  assert error <= 1e-4, error
  alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.numpy()[k]
  np.testing.assert_allclose(jax.nn.sigmoid(logsnr), alphas_cumprod, rtol=1e-5)


def test_a_distillation_config_takes_the_converted_teachers_sections(conditional):
  _, _, out = conditional
  config = config_lib.base_config("digits")
  config.teacher.checkpoint = out
  config = teachers.adopt_converted_teacher(config)
  assert config.model.name == "diffusers_unet"
  assert config.model.diffusers.block_out_channels == [16, 32]
  assert (config.model.time_input, config.model.num_classes) == ("ddpm_timestep", 10)
  assert config.diffusion.parameterization == "eps"
  assert config.diffusion.schedule.name == "linear" and config.diffusion.schedule.beta_end == 0.02
  config_lib.validate(config, jax.device_count())
  assert teachers.model_card(config) == teachers.model_card(teachers.read_export(out))
  config.model.time_input = "t1000"
  with pytest.raises(ConfigError, match="config.model.time_input"):
    config_lib.validate(config, jax.device_count())


def test_a_converted_dit_is_jdistills_dit_and_predicts_what_pytorch_does(tmp_path):
  """A DiTTransformer2DModel converts into jdistill's own DiT (model.name 'dit'): its eps
  prediction through the Denoiser is PyTorch's output at the matching DDPM timesteps."""
  from test_dit import _diffusers_dit
  model, _ = _diffusers_dit()
  model.save_pretrained(str(tmp_path / "dit"))
  DDPMScheduler(num_train_timesteps=1000).save_config(str(tmp_path / "scheduler"))
  out = str(tmp_path / "teacher.msgpack")
  exported = convert.convert(str(tmp_path / "dit"), str(tmp_path / "scheduler"), out)
  assert exported["converted_from"] == "DiTTransformer2DModel"
  assert {k: exported["model"][k] for k in ("name", "channels", "num_heads", "depth", "patch_size",
                                             "num_classes", "time_input")} == dict(
      name="dit", channels=16, num_heads=2, depth=2, patch_size=2, num_classes=10,
      time_input="ddpm_timestep")
  denoiser, params, schedule, _ = converted_denoiser(out, (8, 8, 4))
  rng = np.random.RandomState(2)
  x = rng.randn(2 * len(TIMESTEPS), 8, 8, 4).astype(np.float32)
  k = np.repeat(np.asarray(TIMESTEPS), 2)
  labels = np.arange(len(x)) % 11                                # 10: the null class
  logsnr = schedule(jnp.asarray((k + 1) / 1000.0))
  pred = jax.jit(denoiser.predict)(params, jnp.asarray(x), logsnr, jnp.asarray(labels))
  error = np.abs(np.asarray(pred.eps) - torch_output(model, x, k, labels)).max()
  assert error <= 1e-4, error
  config = config_lib.base_config("digits")
  config.teacher.checkpoint = out
  assert teachers.adopt_converted_teacher(config).model.name == "dit"


@pytest.mark.parametrize("damage", ["rename", "drop", "reshape"])
def test_a_bad_state_dict_key_is_named(conditional, tmp_path, damage):
  _, root, _ = conditional
  folder = tmp_path / "unet"
  shutil.copytree(root / "unet", folder)
  weights = folder / convert.WEIGHTS
  state = load_file(str(weights))
  key = "up_blocks.0.attentions.1.to_q.weight"
  if damage == "rename":
    state["up_blocks.0.attentions.1.to_query.weight"] = state.pop(key)
  elif damage == "drop":
    del state[key]
  else:
    state[key] = state[key][:, :8]
  save_file(state, str(weights))
  with pytest.raises(convert.ConversionError) as error:
    convert.convert(str(folder), str(root / "scheduler_config.json"), str(tmp_path / "t.msgpack"))
  message = str(error.value)
  assert f"'{key}'" in message
  if damage == "rename":
    assert "unexpected key 'up_blocks.0.attentions.1.to_query.weight'" in message
  if damage == "reshape":
    assert "(32, 8)" in message
  assert not (tmp_path / "t.msgpack").exists()


@pytest.mark.parametrize("kind, field, value", [
    ("DDPMScheduler", "beta_schedule", "squaredcos_cap_v2"),
    ("DDIMScheduler", "thresholding", True),
    ("DDPMScheduler", "variance_type", "learned_range"),
    ("DDPMScheduler", "prediction_type", "flow"),
    ("FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting", True),
    ("EulerDiscreteScheduler", "_class_name", "EulerDiscreteScheduler"),
])
def test_an_unsupported_scheduler_option_is_named(kind, field, value):
  with pytest.raises(convert.ConversionError, match=f"scheduler config: {field}="):
    convert.diffusion_of_scheduler({"_class_name": kind, field: value})


def test_an_unsupported_block_is_named():
  with pytest.raises(ConfigError, match="down_block_types"):
    diffusers_unet.from_config({"_class_name": "UNet2DModel", "block_out_channels": [16, 32],
                                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                                "up_block_types": ["UpBlock2D", "UpBlock2D"]})


def run_sampler(denoiser, params, schedule, noise, grid, clip_x):
  predict = lambda z, logsnr: denoiser.predict(params, z, logsnr)
  return np.asarray(jax.jit(lambda z: sampling.sample(
      predict, schedule, z, len(grid) - 1, clip_x=clip_x, grid=jnp.asarray(grid)))(noise))


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_samples_match_diffusers(tmp_path, clip):
  """50 DDIM steps of a DDPM teacher, diffusers' DDIMScheduler (what DDIMPipeline runs, alpha at
  the end set to one) from the same noise; jdistill's clip_x recomputes eps from the clipped x,
  which is diffusers' use_clipped_model_output."""
  model = tiny_unet(tmp_path / "unet", seed=1, downsample_padding=0, flip_sin_to_cos=False,
                    freq_shift=1, norm_eps=1e-6)       # google/ddpm-cifar10-32's options
  ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=clip)
  out = str(tmp_path / "teacher.msgpack")
  convert.convert(str(tmp_path / "unet"), save_scheduler(ddpm, tmp_path), out)
  denoiser, params, schedule, config = converted_denoiser(out)
  assert config.diffusion.clip_x == clip
  scheduler = DDIMScheduler.from_config(ddpm.config)
  scheduler.set_timesteps(50)
  noise = np.random.RandomState(2).randn(4, *SHAPE).astype(np.float32)
  z = torch.from_numpy(noise.transpose(0, 3, 1, 2))
  with torch.no_grad():
    for t in scheduler.timesteps:
      z = scheduler.step(model(z, t).sample, t, z, eta=0.0, use_clipped_model_output=clip).prev_sample
  theirs = z.numpy().transpose(0, 2, 3, 1)
  grid = convert.ddim_grid(scheduler.timesteps.numpy(), 1000)
  ours = run_sampler(denoiser, params, schedule, noise, grid, clip)
  assert np.abs(ours - theirs).max() <= 5e-5 * max(1.0, np.abs(theirs).max())


def test_flow_euler_samples_match_diffusers(tmp_path):
  """50 Euler steps of a flow-matching teacher (velocity, time shift 3) against diffusers'
  FlowMatchEulerDiscreteScheduler loop from the same noise."""
  model = tiny_unet(tmp_path / "unet", seed=2, attention_head_dim=None, mid_block_scale_factor=2.0)
  flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  out = str(tmp_path / "teacher.msgpack")
  convert.convert(str(tmp_path / "unet"), save_scheduler(flow, tmp_path), out)
  denoiser, params, schedule, config = converted_denoiser(out)
  assert (config.diffusion.schedule.name, config.diffusion.schedule.shift) == ("flow", 3.0)
  flow.set_timesteps(50)
  noise = np.random.RandomState(3).randn(4, *SHAPE).astype(np.float32)
  z = torch.from_numpy(noise.transpose(0, 3, 1, 2))
  with torch.no_grad():
    for t in flow.timesteps:
      z = flow.step(model(z, t).sample, t, z).prev_sample
  theirs = z.numpy().transpose(0, 2, 3, 1)
  grid = convert.euler_grid(flow.sigmas.numpy(), 3.0)
  alpha, sigma = alpha_sigma(schedule(1.0))     # the VP z whose flow state is the noise
  ours = run_sampler(denoiser, params, schedule, noise * (alpha + sigma), grid, False)
  assert np.abs(ours - theirs).max() <= 5e-5 * max(1.0, np.abs(theirs).max())


def test_sharded_bf16_weights_stay_bf16_unless_asked(tmp_path):
  model = tiny_unet(tmp_path / "float32", seed=3)
  model.to(torch.bfloat16).save_pretrained(tmp_path / "unet", max_shard_size="100KB")
  assert (tmp_path / "unet" / (convert.WEIGHTS + ".index.json")).exists()
  scheduler = save_scheduler(DDPMScheduler(), tmp_path)
  for dtype, want in (("", "bfloat16"), ("float32", "float32")):
    out = str(tmp_path / f"teacher_{want}.msgpack")
    exported = convert.convert(str(tmp_path / "unet"), scheduler, out, dtype=dtype)
    with open(out, "rb") as f:
      leaves = jax.tree.leaves(serialization.msgpack_restore(f.read()))
    assert exported["model"]["dtype"] == want
    assert {leaf.dtype.name for leaf in leaves} == {want}
    assert len(leaves) == len(load_file(str(tmp_path / "float32" / convert.WEIGHTS)))


def test_a_run_builds_and_loads_the_converted_teacher(tmp_path, digits_config):
  """--config.teacher.checkpoint=<converted>.msgpack: setup.build makes its network and
  load_teacher reads its params (digits: 8x8x1; a v-prediction teacher)."""
  torch.manual_seed(4)
  UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
              layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
              attention_head_dim=8).save_pretrained(tmp_path / "unet")
  scheduler = save_scheduler(DDPMScheduler(prediction_type="v_prediction", clip_sample=False),
                             tmp_path)
  out = str(tmp_path / "teacher.msgpack")
  convert.convert(str(tmp_path / "unet"), scheduler, out)
  digits_config.teacher.checkpoint = out
  config = teachers.adopt_converted_teacher(digits_config)
  exp = setup.build(config, str(tmp_path / "run"), evaluator=False, record_config=False)
  params = teachers.load_teacher(exp)
  assert (exp.denoiser.parameterization, exp.denoiser.time_input) == ("v", "ddpm_timestep")
  assert len(exp.denoiser.ddpm_logsnr) == 1000 and not config.diffusion.clip_x
  assert len(jax.tree.leaves(params)) == len(load_file(str(tmp_path / "unet" / convert.WEIGHTS)))


def test_a_student_exports_to_diffusers_and_samples_there_as_here(tmp_path):
  """A 4-step student of a converted DDPM teacher (its params, changed), exported by jdistill.export:
  diffusers loads the folder, its network gives jdistill's outputs, and its DDIMScheduler loop
  (trailing spacing, 4 steps) gives jdistill's 4-step samples."""
  from diffusers import UNet2DModel
  from jdistill import export
  tiny_unet(tmp_path / "unet", seed=4)
  out = str(tmp_path / "teacher.msgpack")
  convert.convert(str(tmp_path / "unet"), save_scheduler(DDPMScheduler(clip_sample=True), tmp_path),
                  out)
  denoiser, params, schedule, config = converted_denoiser(out)
  student = jax.tree.map(lambda p: p * 1.05, params)
  path = str(tmp_path / "student.msgpack")
  teachers.export(student, config, path, {"mode": "ddim", "steps": 4, "guidance": 0.0})
  scheduler_config = export.export(path, str(tmp_path / "diffusers"))
  assert scheduler_config["jdistill_steps"] == 4
  model = UNet2DModel.from_pretrained(str(tmp_path / "diffusers" / "unet")).eval()
  x = np.random.RandomState(5).randn(8, *SHAPE).astype(np.float32)
  t = np.asarray([0, 999, 250, 500, 749, 10, 600, 999], np.float32)
  ours = jax.jit(denoiser.apply_module)(student, jnp.asarray(x), schedule(jnp.asarray((t + 1) / 1000)),
                                        None)
  assert np.abs(np.asarray(ours) - torch_output(model, x, t)).max() <= 1e-4
  scheduler = DDIMScheduler.from_pretrained(str(tmp_path / "diffusers" / "scheduler"))
  scheduler.set_timesteps(4)
  assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
  noise = np.random.RandomState(6).randn(4, *SHAPE).astype(np.float32)
  theirs = export.sample_in_diffusers(str(tmp_path / "diffusers"), noise)
  here = run_sampler(denoiser, student, schedule, noise, np.linspace(0.0, 1.0, 5), True)
  assert np.abs(here - theirs).max() <= 5e-5 * max(1.0, np.abs(theirs).max())
