"""The config sections every method shares (data, model, diffusion, optim, train, eval, mesh, the
training controls curriculum / features / lora, and which teacher) and their validation. A method
adds its own section, defaults and checks in jdistill/methods/<method>.py; `validate` here checks
the shared sections before any compute and names the offending field."""
from __future__ import annotations

import os

from absl import logging
import ml_collections

from jdistill.curriculum import SAMPLERS
from jdistill.diffusion.losses import WEIGHTINGS
from jdistill.diffusion.parameterization import PARAMETERIZATIONS
from jdistill.diffusion.schedules import SCHEDULES
from jdistill.errors import ConfigError, check_choice
from jdistill.models.denoiser import MODELS, REMAT_POLICIES, TIME_INPUTS, check_dit
from jdistill.objectives.progressive import FEATURE_SCHEDULES
from jdistill.objectives.state import LR_SCHEDULES, OPTIMIZERS

PRESETS = ("digits", "toy2d", "mnist", "cifar10", "imagenet64")
FLOW = "_flow"      # `<preset>_flow`: the preset on the rectified-flow path (e.g. `digits_flow`)
DIT = "_dit"        # `<preset>_dit`: the preset with a DiT for its network (`digits_dit_flow`)
COND = "_cond"      # `<preset>_cond`: class-conditional, labels dropped to the null class for CFG
SUFFIXES = (FLOW, COND, DIT)    # in this order from the end: `digits_dit_cond_flow`
NUM_CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "imagenet64": 1000}
TIME_SAMPLINGS = ("uniform", "logit_normal")


def data_preset(preset: str) -> str:
  """The preset without its `_dit`, `_cond` and `_flow` suffixes (what sizes data, model and
  budget)."""
  return preset_parts(preset)[0]


def preset_parts(preset: str):
  """(the data preset, the set of its SUFFIXES)."""
  found = set()
  for suffix in SUFFIXES:
    if preset.endswith(suffix):
      preset, found = preset.removesuffix(suffix), found | {suffix}
  return preset, found
DATA_SOURCES = ("digits", "toy2d", "tfds", "image_folder")
FEATURE_NETS = ("digits", "raw", "inception")


def base_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """The shared sections of `preset` (one of PRESETS, or one with the `_flow` suffix)."""
  full_preset = preset or "digits"
  preset, suffixes = preset_parts(full_preset)
  if preset not in PRESETS:
    raise ConfigError(f"config preset: unknown {full_preset!r}; choose one of {PRESETS}, each "
                      f"also as `<preset>{FLOW}` (rectified flow), the image ones as "
                      f"`<preset>{DIT}` (a DiT) and `<preset>{COND}` (class-conditional), in the "
                      f"order `<preset>{DIT}{COND}{FLOW}`")
  c = ml_collections.ConfigDict()
  c.method = "teacher"
  c.preset = full_preset
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      source="digits", name="", path="", data_dir="", train_split="train", test_split="test",
      resolution=0, batch_size=128, flip=False))
  c.model = ml_collections.ConfigDict(dict(
      name="unet", channels=48, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(4,),
      num_heads=1, dropout=0.0, num_classes=0, norm_groups=8, dtype="float32",
      time_input="logsnr",      # the network's time: 'logsnr', the flow's tau: 't', 't1000', or
                                # a DDPM schedule's timestep: 'ddpm_timestep' (diffusers' UNets)
      patch_size=2, depth=7))   # 'dit' only (its hidden size is `channels`)

  c.diffusion = ml_collections.ConfigDict(dict(
      # 'linear' / 'scaled_linear': DDPM beta schedules over num_train_timesteps; the default
      # betas are Stable Diffusion's (with 'scaled_linear'; DDPM's own 'linear' is 1e-4 to 0.02);
      # zero_terminal_snr rescales them to reach pure noise (Lin et al. 2024); 'flow': rectified
      # flow, z = (1 - tau) x + tau eps, tau = shift t / (1 + (shift - 1) t) (SD3)
      schedule=ml_collections.ConfigDict(dict(name="cosine", num_train_timesteps=1000,
                                              beta_start=0.00085, beta_end=0.012,
                                              zero_terminal_snr=False, shift=1.0)),
      parameterization="v", loss_weighting="v_mse", min_snr_gamma=5.0, label_dropout=0.1,
      clip_x=True, guidance=0.0,
      # the denoising objective's training times: t ~ U(0, 1), or 'logit_normal' (SD3):
      # t = sigmoid(n), n ~ N(logit_mean, logit_std^2)
      time_sampling="uniform", logit_mean=0.0, logit_std=1.0))
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, warmup_steps=200, schedule="cosine", final_lr_fraction=0.05,
      grad_clip=1.0, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, ema_decay=0.9995,
      ema_warmup=False,         # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
      accumulate_steps=1))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=16000, log_every=200, eval_every=4000, save_every=1000,
      early_stopping_patience=0,
      remat="none"))      # every network pass under jax.checkpoint: 'full' keeps nothing for the
                          # backward pass, 'dots' its matmul outputs (less memory, more compute)
  c.eval = ml_collections.ConfigDict(dict(
      features="digits", inception_weights="", num_samples=1000, steps_during_training=(64,),
      final_steps=(256, 64, 16, 4, 2, 1), batch_size=500,
      final_num_samples=0,      # the end-of-run FD tables (0: num_samples); FD's spread between
                                # noise seeds falls with the count (docs/results.md)
      neighbour_examples=10_000))   # held-out and training examples (a fixed random subset of
                                    # each split, 0: all) for memorisation and precision / recall
  c.mesh = ml_collections.ConfigDict(dict(fsdp=1))
  # timestep sampler: 'uniform' or 'adaptive' (jdistill/curriculum.py)
  c.curriculum = ml_collections.ConfigDict(dict(
      sampler="uniform", num_regions=3, smoothing=0.9, temperature=1.0, min_weight=0.1,
      update_every=50, importance_weighting=True))
  # feature distillation on U-Net activations (off while both weights are 0)
  c.features = ml_collections.ConfigDict(dict(
      layers=("bottleneck",), weight_start=0.0, weight_end=0.0, schedule="cosine"))
  # LoRA student (off while rank is 0)
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=4.0, targets=(".*",)))
  c.teacher = ml_collections.ConfigDict(dict(checkpoint="", sampling_steps=256))
  # a guidance-conditioned student (off while w_max is 0): told w ~ U[w_min, w_max] per example by
  # a zero-initialised embedding, it learns the teacher's classifier-free guidance at that w
  # (guided distillation, DMD2, TDM, sCD, CD, MeanFlow). eval_w: the w of evaluations during training and the
  # exported student's default; summary_w: the w of the end-of-run table
  c.student_guidance = ml_collections.ConfigDict(dict(
      w_min=0.0, w_max=0.0, eval_w=2.0, summary_w=(0.0, 1.0, 2.0, 4.0)))

  if preset == "toy2d":
    c.data.update(source="toy2d", name="checkerboard", batch_size=512)
    c.model.update(name="mlp", channels=256, num_res_blocks=3)
    c.diffusion.update(clip_x=False)
    c.optim.update(lr=1e-3, warmup_steps=100)
    c.train.update(num_steps=20000, log_every=1000, eval_every=5000)   # ~5 min on 2 CPU cores
    c.eval.update(features="raw", num_samples=5000, steps_during_training=(64,),
                  neighbour_examples=5000)
  elif preset in ("mnist", "cifar10", "imagenet64"):
    name, res = {"mnist": ("mnist", 28), "cifar10": ("cifar10", 32),
                 "imagenet64": ("imagenet_resized/64x64", 64)}[preset]
    c.data.update(source="tfds", name=name, resolution=res if preset != "mnist" else 32,
                  batch_size=128 if preset != "imagenet64" else 2048, flip=preset != "mnist",
                  test_split="validation" if preset == "imagenet64" else "test")  # its held-out split
    c.model.update(channels=128 if preset != "mnist" else 64, channel_mult=(1, 2, 2, 2),
                   attention_resolutions=(16,), dropout=0.1 if preset == "cifar10" else 0.0,
                   num_res_blocks=3 if preset == "imagenet64" else 2, norm_groups=32,
                   num_classes=1000 if preset == "imagenet64" else 0, dtype="bfloat16")
    c.optim.update(lr=2e-4, warmup_steps=5000, schedule="constant", ema_decay=0.9999)
    c.train.update(num_steps=800_000 if preset != "mnist" else 100_000, log_every=1000,
                   eval_every=50_000, save_every=10_000)
    c.eval.update(features="inception" if preset != "mnist" else "raw", num_samples=50_000)
  if DIT in suffixes:       # a DiT of about the U-Net's size
    if preset == "toy2d":
      raise ConfigError(f"config preset: {full_preset!r}: a DiT patchifies images; toy2d's data "
                        "are 2-D points")
    c.model.update(name="dit", channels=128, num_heads=4, depth=7, patch_size=2)
    if preset != "digits":           # DiT-S/2
      c.model.update(channels=384, num_heads=6, depth=12)
  if COND in suffixes:      # label_dropout (0.1) trains the null class that CFG guides with
    if preset == "toy2d":
      raise ConfigError(f"config preset: {full_preset!r}: toy2d's data have no classes")
    c.model.num_classes = NUM_CLASSES[preset]
  if FLOW in suffixes:      # a rectified-flow model: its velocity, its MSE
    c.diffusion.schedule.name = "flow"
    c.diffusion.loss_weighting = "flow_v_mse"
  return c


def warn_if_ema_keeps_the_init(config):
  """For a network trained from a random init: warns when the final EMA still holds over 1% of it
  (decay^N; with ema_warmup the first update's decay is 1/10, so the init is all but gone)."""
  init_share = config.optim.ema_decay ** config.train.num_steps
  if not config.optim.ema_warmup and config.train.num_steps > 0 and init_share > 0.01:
    logging.warning("config.optim.ema_decay=%g over train.num_steps=%d: the final EMA still holds "
                    "%.0f%% of the random initialisation, and it is what gets evaluated and "
                    "exported; use a decay of about %.4f or less", config.optim.ema_decay,
                    config.train.num_steps, 100 * init_share, 0.01 ** (1 / config.train.num_steps))


def check(ok, field, message):
  """Raises ConfigError naming `config.<field>` unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}: {message}")


def check_step_counts(field, steps):
  """Raises ConfigError naming `config.<field>` unless `steps` are sampling step counts >= 1."""
  check(len(steps) > 0 and all(isinstance(n, int) and n >= 1 for n in steps), field,
        f"must be sampling step counts >= 1, at least one, got {tuple(steps)}")


def validate(config, num_devices: int):
  """Checks the shared sections; fails fast, naming the field, before any compute (a method's own
  section: jdistill.methods.validate)."""
  check_choice("diffusion.schedule.name", config.diffusion.schedule.name, SCHEDULES)
  check_choice("diffusion.parameterization", config.diffusion.parameterization, PARAMETERIZATIONS)
  check_choice("diffusion.loss_weighting", config.diffusion.loss_weighting, WEIGHTINGS)
  check(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  check_choice("optim.name", config.optim.name, OPTIMIZERS)
  check_choice("train.remat", config.train.get("remat", "none"), tuple(REMAT_POLICIES))
  check_choice("optim.schedule", config.optim.schedule, LR_SCHEDULES)
  check(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
  check(config.optim.eps > 0, "optim.eps", f"must be > 0 (Adam divides by sqrt(v) + eps), got "
        f"{config.optim.eps}")
  for field in ("b1", "b2"):
    check(0.0 <= config.optim[field] < 1.0, f"optim.{field}", f"must be in [0, 1), got "
          f"{config.optim[field]}")
  check(config.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)")
  check(config.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  check(0.0 <= config.optim.final_lr_fraction <= 1.0, "optim.final_lr_fraction",
        f"must be in [0, 1], got {config.optim.final_lr_fraction}")
  check(not (config.diffusion.schedule.zero_terminal_snr and config.diffusion.schedule.name == "cosine"),
        "diffusion.schedule.zero_terminal_snr", "rescales the DDPM beta schedules ('linear', "
        "'scaled_linear'); 'cosine' already ends at pure noise")
  check(config.diffusion.schedule.num_train_timesteps >= 1, "diffusion.schedule.num_train_timesteps",
        "must be >= 1")
  shift = config.diffusion.schedule.get("shift", 1.0)
  check(shift > 0, "diffusion.schedule.shift", f"must be > 0, got {shift}")
  check(shift == 1.0 or config.diffusion.schedule.name == "flow", "diffusion.schedule.shift",
        f"shifts the 'flow' schedule's time; schedule {config.diffusion.schedule.name!r} has none")
  time_input = config.model.get("time_input", "logsnr")
  check_choice("model.time_input", time_input, TIME_INPUTS)
  schedule_name = config.diffusion.schedule.name
  check(time_input not in ("t", "t1000") or schedule_name == "flow", "model.time_input",
        f"{time_input!r} is the flow path's tau; a model of the {schedule_name!r} schedule takes "
        "'logsnr'" + (" or 'ddpm_timestep'" if schedule_name != "cosine" else ""))
  check(time_input != "ddpm_timestep" or schedule_name in ("linear", "scaled_linear"),
        "model.time_input", f"'ddpm_timestep' is the timestep of a DDPM beta schedule ('linear', "
        f"'scaled_linear'); the {schedule_name!r} schedule has none")
  check_choice("diffusion.time_sampling", config.diffusion.get("time_sampling", "uniform"),
               TIME_SAMPLINGS)
  check(config.diffusion.get("logit_std", 1.0) > 0, "diffusion.logit_std",
        f"must be > 0, got {config.diffusion.get('logit_std')}")
  check(config.diffusion.get("time_sampling", "uniform") == "uniform"
        or config.curriculum.sampler == "uniform", "diffusion.time_sampling",
        "the adaptive curriculum draws its own times; use time_sampling='uniform' with it")
  check(config.data.batch_size >= 1, "data.batch_size", f"must be >= 1, got {config.data.batch_size}")
  check(config.data.batch_size % num_devices == 0, "data.batch_size",
        f"{config.data.batch_size} is not divisible by the {num_devices} devices")
  check(config.mesh.fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {config.mesh.fsdp}")
  check(num_devices % config.mesh.fsdp == 0, "mesh.fsdp",
        f"{config.mesh.fsdp} does not divide the {num_devices} devices")
  check(config.train.num_steps > 0, "train.num_steps", "must be > 0")
  check(config.train.log_every > 0, "train.log_every", "must be > 0")
  check(config.train.save_every >= 0, "train.save_every", "must be >= 0 (0: only at the end)")
  check(config.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
  check_choice("model.name", config.model.name, MODELS)
  if config.model.name == "dit":
    check_dit(config.model, config.data.resolution)
  check(config.optim.accumulate_steps >= 1, "optim.accumulate_steps", "must be >= 1")
  check(config.train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
  check_choice("curriculum.sampler", config.curriculum.sampler, SAMPLERS)
  check(0 <= config.curriculum.min_weight * config.curriculum.num_regions <= 1,
        "curriculum.min_weight", "must be in [0, 1 / num_regions]")
  check(config.curriculum.update_every >= 1, "curriculum.update_every", "must be >= 1")
  check_choice("features.schedule", config.features.schedule, FEATURE_SCHEDULES)
  check(config.lora.rank >= 0, "lora.rank", "must be >= 0 (0: off)")
  check_choice("eval.features", config.eval.features, FEATURE_NETS)
  check(config.eval.num_samples >= 2, "eval.num_samples", "must be >= 2 (FD needs a covariance)")
  check(config.eval.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {config.eval.batch_size}")
  for field in ("steps_during_training", "final_steps"):
    check_step_counts(f"eval.{field}", config.eval[field])
  check_student_guidance(config)
  check(config.teacher.sampling_steps >= 1, "teacher.sampling_steps",
        f"must be >= 1, got {config.teacher.sampling_steps}")
  final_count = config.eval.get("final_num_samples", 0)
  check(final_count == 0 or final_count >= 2, "eval.final_num_samples",
        f"must be 0 (= eval.num_samples) or >= 2, got {final_count}")
  check(config.eval.get("neighbour_examples", 0) >= 0, "eval.neighbour_examples",
        f"must be >= 0 (0: all), got {config.eval.get('neighbour_examples')}")
  source = config.data.source
  check_choice("data.source", source, DATA_SOURCES)
  check(config.data.resolution >= 0, "data.resolution", f"must be >= 0 (0: the dataset's own), got "
        f"{config.data.resolution}")
  if source in ("tfds", "image_folder"):
    check(config.data.test_split != config.data.train_split, "data.test_split",
          f"{config.data.test_split!r} is the training split; evaluation needs held-out data")
  if source == "tfds":
    check(bool(config.data.name), "data.name", "a TFDS dataset name is required (e.g. 'cifar10')")
    import tensorflow_datasets as tfds
    try:
      tfds.builder(config.data.name, data_dir=config.data.data_dir or None)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for a missing dataset
      raise ConfigError(f"config.data.name: TFDS dataset {config.data.name!r} not found ({e})") from e
  if source == "image_folder":
    check(os.path.isdir(config.data.path), "data.path", f"{config.data.path!r} is not a directory")
    for field in ("train_split", "test_split"):
      folder = os.path.join(config.data.path, config.data[field])
      check(os.path.isdir(folder), f"data.{field}", f"no folder {folder!r}; image_folder reads each "
            "split from its own folder under data.path")
    check(config.data.resolution > 0, "data.resolution", "image_folder needs a resolution > 0")
  if config.eval.features == "inception":
    check(os.path.isfile(config.eval.inception_weights), "eval.inception_weights",
          f"InceptionV3 FID weights file {config.eval.inception_weights!r} not found; "
          "jdistill never downloads weights: pass the path of a file you have")


def student_guidance_range(config) -> tuple:
  """(w_min, w_max) of a guidance-conditioned student, or () when the control is off."""
  g = config.get("student_guidance")
  return (float(g.w_min), float(g.w_max)) if g is not None and g.w_max > 0 else ()


def check_student_guidance(config):
  if not student_guidance_range(config):
    return
  g = config.student_guidance
  check(0.0 <= g.w_min < g.w_max, "student_guidance.w_min",
        f"need 0 <= w_min < w_max, got [{g.w_min}, {g.w_max}]")
  check(config.model.num_classes > 0, "model.num_classes",
        "a guidance-conditioned student needs a class-conditional teacher (e.g. preset digits_cond)")
  check(config.diffusion.label_dropout > 0, "diffusion.label_dropout",
        "the teacher must have learned the null class that CFG guides with (label_dropout > 0)")
  check(config.model.name in ("unet", "dit", "mlp"), "model.name",
        f"{config.model.name!r} has no guidance embedding (jdistill's 'unet', 'dit' and 'mlp' do)")
  check(config.diffusion.guidance == 0, "diffusion.guidance",
        "a guidance-conditioned student learns every w of student_guidance; one fixed teacher "
        "guidance must stay 0")
  check(g.eval_w >= 0, "student_guidance.eval_w", f"must be >= 0, got {g.eval_w}")
  check(len(g.summary_w) > 0 and min(g.summary_w) >= 0, "student_guidance.summary_w",
        f"need one or more w >= 0, got {tuple(g.summary_w)}")
