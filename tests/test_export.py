"""Exporting jdistill's own U-Net students to diffusers (jdistill.export): diffusers loads the folder,
and its DDIMScheduler loop samples what jdistill's sampler samples from the same noise, on uniform
and nested grids, with a step-count and a guidance embedding folded in; and what does not export
is refused, naming why."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from conftest import tiny_teacher_params, tiny_unet
from jdistill import config as config_lib
from jdistill import export
from jdistill.convert import ConversionError
from jdistill.diffusion import sampling
from jdistill.diffusion.schedules import make_schedule
from jdistill.methods import common
from jdistill.models.denoiser import make_denoiser, with_zero_embedding

SHAPE = (8, 8, 1)
LABELS = np.arange(6) % 10


def student(tmp_path, parameterization="eps", steps=4, grid=None, guidance=1.5, mode="ddim",
            schedule="cosine", dit_time=None, num_classes=10):
  """A tiny U-Net student (a DiT taking `dit_time`, if given) with step-count and guidance
  embeddings (random, off zero), exported as a run exports it: (config, denoiser, params, path)."""
  if dit_time is None:
    config = tiny_unet(config_lib.base_config("digits"))
  else:
    config = config_lib.base_config("digits_dit")
    config.model.update(channels=16, num_heads=2, depth=2, time_input=dit_time)
  config.model.num_classes = num_classes
  config.diffusion.parameterization = parameterization
  config.diffusion.schedule.name = schedule
  config.diffusion.clip_x = schedule != "flow"
  denoiser = make_denoiser(config.model, SHAPE, parameterization,
                           "flow" if schedule == "flow" else "vp", config.diffusion.schedule)
  params = with_zero_embedding(denoiser, tiny_teacher_params(config, 1), jnp.zeros((1, *SHAPE)),
                               guided=True, step_conditioned=True)
  rng = np.random.RandomState(3)
  params = jax.tree.map(lambda p: p + 0.05 * rng.randn(*p.shape).astype(np.float32), params)
  path = str(tmp_path / "student.msgpack")
  common.export(params, config, path, mode, steps, grid=grid, guidance=guidance)
  return config, denoiser, params, path


def jdistill_samples(config, denoiser, params, noise, steps, guidance, grid=None, labels=LABELS):
  schedule = make_schedule(config.diffusion.schedule)

  def predict(z, logsnr):
    label = None if labels is None else jnp.asarray(labels)
    return denoiser.predict_with_guidance(params, z, logsnr, label, guidance,
                                          steps=jnp.full((z.shape[0],), steps, jnp.int32))
  grid = None if grid is None else sampling.padded_grid(grid, steps)
  return np.asarray(jax.jit(lambda n: sampling.sample(predict, schedule, n, steps, grid=grid,
                                                      clip_x=config.diffusion.clip_x))(noise))


@pytest.mark.parametrize("parameterization,steps,nested", [
    ("eps", 4, False),        # T = 1000: timesteps 999, 749, 499, 249
    ("v", 64, False),         # 64 does not divide 1000: T = 1024
    ("x", 1, False),
    ("v", 7, True),           # the 7-step grid nested in 25, 13, 7 (non-uniform): T = 1001
])
def test_a_student_samples_in_diffusers_as_here(tmp_path, parameterization, steps, nested):
  grid = [0, 2, 6, 10, 14, 18, 22, 25] if nested else None
  grid = None if grid is None else [i / 25 for i in grid]
  config, denoiser, params, path = student(tmp_path, parameterization, steps, grid)
  scheduler = export.export(path, str(tmp_path / "diffusers"))
  total = scheduler["num_train_timesteps"]
  assert total % steps == 0 and 1000 <= total < 1000 + steps
  assert (scheduler["jdistill_steps"], scheduler["jdistill_guidance"]) == (steps, 1.5)
  noise = np.random.RandomState(6).randn(6, *SHAPE).astype(np.float32)
  theirs = export.sample_in_diffusers(str(tmp_path / "diffusers"), noise, LABELS)
  here = jdistill_samples(config, denoiser, params, noise, steps, 1.5, grid)
  assert np.abs(here - theirs).max() <= 5e-5


def test_the_guidance_weight_is_chosen_at_export(tmp_path):
  """--guidance=4 exports the student at w = 4: diffusers samples what jdistill samples at w = 4,
  and not what it samples at the run's w = 1.5."""
  config, denoiser, params, path = student(tmp_path, steps=2)
  export.export(path, str(tmp_path / "diffusers"), guidance=4.0)
  noise = np.random.RandomState(7).randn(6, *SHAPE).astype(np.float32)
  theirs = export.sample_in_diffusers(str(tmp_path / "diffusers"), noise, LABELS)
  assert np.abs(jdistill_samples(config, denoiser, params, noise, 2, 4.0) - theirs).max() <= 5e-5
  assert np.abs(jdistill_samples(config, denoiser, params, noise, 2, 1.5) - theirs).max() > 1e-2


def test_the_exported_network_is_the_student_at_every_timestep(tmp_path):
  """The UNet2DModel at timestep k is the U-Net at the scheduler's time of k (its learned table)."""
  config, denoiser, params, path = student(tmp_path, "v", steps=4)
  scheduler = export.export(path, str(tmp_path / "diffusers"))
  model = UNet2DModel.from_pretrained(str(tmp_path / "diffusers" / "unet")).eval()
  timesteps = np.asarray([0, 3, 249, 500, 998, 999])
  x = np.random.RandomState(8).randn(6, *SHAPE).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.as_tensor(timesteps),
                   class_labels=torch.as_tensor(LABELS)).sample.numpy().transpose(0, 2, 3, 1)
  logsnr = make_schedule(config.diffusion.schedule)(jnp.asarray((timesteps + 1) / 1000, jnp.float32))
  here = denoiser.apply_module(params, jnp.asarray(x), logsnr, jnp.asarray(LABELS),
                               steps=jnp.full((6,), 4), guidance=jnp.full((6,), 1.5))
  assert scheduler["num_train_timesteps"] == 1000
  assert np.abs(np.asarray(here) - theirs).max() <= 1e-4


@pytest.mark.parametrize("change,message", [
    (dict(mode="renoise", steps=2), "sampling.mode='renoise'"),
    (dict(schedule="flow"), "diffusion.schedule.name='flow'"),
])
def test_what_diffusers_cannot_sample_so_is_refused(tmp_path, change, message):
  *_, path = student(tmp_path, **change)
  with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
    export.export(path, str(tmp_path / "diffusers"))


def test_a_guidance_weight_for_an_unguided_model_is_refused(tmp_path):
  config = tiny_unet(config_lib.base_config("digits"))
  path = str(tmp_path / "teacher.msgpack")
  common.export(tiny_teacher_params(config, 1), config, path, "ddim", 4)
  with pytest.raises(ConversionError, match="not guidance-conditioned"):
    export.export(path, str(tmp_path / "diffusers"), guidance=2.0)
  export.export(path, str(tmp_path / "diffusers"))          # without a w it exports


@pytest.mark.parametrize("schedule,dit_time,num_classes", [
    ("linear", "ddpm_timestep", 10),    # DDIMScheduler over DDPM's betas
    ("flow", "t1000", 0),               # FlowMatchEulerDiscreteScheduler; unconditional
])
def test_a_dit_that_takes_the_schedulers_timestep_exports_as_diffusers_dit(
    tmp_path, schedule, dit_time, num_classes):
  """A DiT taking a DDPM timestep (converted ones do) or 1000 tau exports as a
  DiTTransformer2DModel with its scheduler; diffusers' loop samples what jdistill samples."""
  config, denoiser, params, path = student(tmp_path, "eps" if schedule == "linear" else "v",
                                           steps=4, schedule=schedule, dit_time=dit_time,
                                           num_classes=num_classes)
  scheduler = export.export(path, str(tmp_path / "diffusers"))
  assert scheduler["_class_name"] == ("DDIMScheduler" if schedule == "linear"
                                      else "FlowMatchEulerDiscreteScheduler")
  labels = LABELS if num_classes else None
  noise = np.random.RandomState(9).randn(6, *SHAPE).astype(np.float32)
  theirs = export.sample_in_diffusers(str(tmp_path / "diffusers"), noise, labels)
  here = jdistill_samples(config, denoiser, params, noise, 4, 1.5, labels=labels)
  assert np.abs(here - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


def test_a_dit_on_jdistills_logsnr_time_is_refused(tmp_path):
  *_, path = student(tmp_path, dit_time="logsnr")
  with pytest.raises(ConversionError, match="model.time_input='logsnr'"):
    export.export(path, str(tmp_path / "diffusers"))


@pytest.mark.parametrize("dit_time", [None, "ddpm_timestep"])
def test_a_lora_student_exports_merged_and_as_a_peft_adapter(tmp_path, dit_time):
  """A LoRA student (adapters on every kernel, attention included) exports merged, and its adapters
  as a PEFT LoRA: PEFT puts them on the base model exported the same way, which then predicts what
  the merged export does."""
  from peft import PeftModel
  from jdistill.models.lora import LoRA
  config, denoiser, base, _ = student(tmp_path, steps=2, guidance=0.0, dit_time=dit_time,
                                      schedule="linear" if dit_time else "cosine")
  base = {k: v for k, v in base.items() if k not in export.FOLDED}     # a LoRA over the teacher
  config.lora.update(rank=2, alpha=4.0)
  lora = LoRA(rank=2, alpha=4.0)
  adapters = lora.init(jax.random.key(1), base)
  rng = np.random.RandomState(4)
  adapters = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.randn(*a.shape).astype(np.float32),
                          adapters)                                      # B off zero
  merged = jax.tree.map(np.asarray, lora.merge(base, adapters))
  common.export(merged, config, str(tmp_path / "student.msgpack"), "ddim", 2,
                adapters={"base": "the teacher", "adapters": adapters})
  common.export(base, config, str(tmp_path / "base.msgpack"), "ddim", 2)
  export.export(str(tmp_path / "student.msgpack"), str(tmp_path / "student"))
  export.export(str(tmp_path / "base.msgpack"), str(tmp_path / "base"))
  folder = "transformer" if dit_time else "unet"
  model_class = export.diffusers_class(str(tmp_path / "base" / folder))
  adapted = PeftModel.from_pretrained(model_class.from_pretrained(str(tmp_path / "base" / folder)),
                                      str(tmp_path / "student" / f"{folder}_lora")).eval()
  full = model_class.from_pretrained(str(tmp_path / "student" / folder)).eval()
  x = torch.from_numpy(np.random.RandomState(5).randn(6, 1, 8, 8).astype(np.float32))
  t = torch.as_tensor([999, 600, 499, 250, 10, 0])
  with torch.no_grad():
    theirs = adapted(x, t, class_labels=torch.as_tensor(LABELS)).sample
    merged_out = full(x, t, class_labels=torch.as_tensor(LABELS)).sample
    base_out = model_class.from_pretrained(str(tmp_path / "base" / folder))(
        x, t, class_labels=torch.as_tensor(LABELS)).sample
  assert (theirs - merged_out).abs().max() <= 1e-4 * max(1.0, float(merged_out.abs().max()))
  assert (base_out - merged_out).abs().max() > 1e-2          # the adapters change the model
