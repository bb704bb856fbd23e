"""Shared config defaults and validation. Method configs live in configs/<method>.py and call
`base_config(preset)`; `validate` runs before any compute and names the offending field."""
from __future__ import annotations

import math
import os
import re

from absl import logging
import ml_collections

from jdistill.diffusion.losses import WEIGHTINGS
from jdistill.diffusion.parameterization import PARAMETERIZATIONS
from jdistill.diffusion.schedules import SCHEDULES

PRESETS = ("digits", "toy2d", "mnist", "cifar10", "imagenet64")
BUNDLED_DIGITS_TEACHER = os.path.join(os.path.dirname(__file__), "assets", "digits_teacher.msgpack")
CACHE_DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
  """An invalid config field (raised before any compute)."""


def base_config(preset: str = "digits") -> ml_collections.ConfigDict:
  preset = preset or "digits"
  if preset not in PRESETS:
    raise ConfigError(f"config preset: unknown {preset!r}; choose one of {PRESETS}")
  c = ml_collections.ConfigDict()
  c.method = "teacher"
  c.preset = preset
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      source="digits", name="", path="", data_dir="", train_split="train", test_split="test",
      resolution=0, batch_size=128, flip=False))
  c.model = ml_collections.ConfigDict(dict(
      name="unet", channels=48, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(4,),
      num_heads=1, dropout=0.0, num_classes=0, norm_groups=8, dtype="float32"))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=ml_collections.ConfigDict(dict(name="cosine", num_train_timesteps=1000,
                                              beta_start=0.00085, beta_end=0.012)),
      parameterization="v", loss_weighting="v_mse", min_snr_gamma=5.0, label_dropout=0.1,
      clip_x=True, guidance=0.0))
  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, warmup_steps=200, schedule="cosine", final_lr_fraction=0.05,
      grad_clip=1.0, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8, ema_decay=0.9995,
      ema_warmup=False,         # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
      accumulate_steps=1))
  c.train = ml_collections.ConfigDict(dict(
      num_steps=16000, log_every=200, eval_every=4000, save_every=1000,
      early_stopping_patience=0))
  c.eval = ml_collections.ConfigDict(dict(
      features="digits", inception_weights="", num_samples=1000, steps_during_training=(64,),
      final_steps=(256, 64, 16, 4, 2, 1), batch_size=500,
      final_num_samples=0))     # the end-of-run FD tables (0: num_samples); FD's spread between
                                # noise seeds falls with the count (docs/results.md)
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

  if preset == "toy2d":
    c.data.update(source="toy2d", name="checkerboard", batch_size=512)
    c.model.update(name="mlp", channels=256, num_res_blocks=3)
    c.diffusion.update(clip_x=False)
    c.optim.update(lr=1e-3, warmup_steps=100)
    c.train.update(num_steps=20000, log_every=1000, eval_every=5000)   # ~5 min on 2 CPU cores
    c.eval.update(features="raw", num_samples=5000, steps_during_training=(64,))
  elif preset in ("mnist", "cifar10", "imagenet64"):
    name, res = {"mnist": ("mnist", 28), "cifar10": ("cifar10", 32),
                 "imagenet64": ("imagenet_resized/64x64", 64)}[preset]
    c.data.update(source="tfds", name=name, resolution=res if preset != "mnist" else 32,
                  batch_size=128 if preset != "imagenet64" else 2048, flip=preset != "mnist")
    c.model.update(channels=128 if preset != "mnist" else 64, channel_mult=(1, 2, 2, 2),
                   attention_resolutions=(16,), dropout=0.1 if preset == "cifar10" else 0.0,
                   num_res_blocks=3 if preset == "imagenet64" else 2, norm_groups=32,
                   num_classes=1000 if preset == "imagenet64" else 0, dtype="bfloat16")
    c.optim.update(lr=2e-4, warmup_steps=5000, schedule="constant", ema_decay=0.9999)
    c.train.update(num_steps=800_000 if preset != "mnist" else 100_000, log_every=1000,
                   eval_every=50_000, save_every=10_000)
    c.eval.update(features="inception" if preset != "mnist" else "raw", num_samples=50_000)
  return c


def progressive_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Defaults of progressive distillation (configs/progressive.py, configs/curriculum.py)."""
  config = base_config(preset)
  config.method = "progressive"
  config.progressive = ml_collections.ConfigDict(dict(
      steps="",               # "" = strict halving from teacher.sampling_steps to 1; or "25,13,7,4,2,1"
      two_step=True,          # False: the 'direct' variant (targets from the original teacher)
      loss_weighting="snr_trunc",
      steps_per_stage=500,
      epochs_per_stage=0.0,   # > 0 overrides steps_per_stage
      stage_overrides="",     # e.g. "0:3000,4:4000"
      start_stage=0,
      eval_every=0,           # evaluate mid-stage too (0: only at each stage's end)
      best_metric="fd",       # the 'best' checkpoint of each stage (lower is better)
      validation_examples=500,  # held-out examples for the per-eval validation distillation loss
  ))
  config.train.save_every = 250
  config.train.log_every = 50
  config.optim.update(lr=5e-4, warmup_steps=0, schedule="linear", final_lr_fraction=0.0,
                      ema_decay=0.995)
  if preset == "digits":       # 64 -> 32 -> ... -> 1 in ~15 min on 2 CPU cores; later stages need more
    config.teacher.sampling_steps = 64
    config.data.batch_size = 64
    config.progressive.stage_overrides = "0:300,1:300,2:400,3:600,4:900,5:1400"
  elif preset == "toy2d":
    config.teacher.sampling_steps = 64
    config.progressive.steps_per_stage = 1000
  elif preset in ("cifar10", "imagenet64"):     # the paper: 1024 -> 1 with 50k steps per stage
    config.teacher.sampling_steps = 1024 if preset == "cifar10" else 1024
    config.progressive.steps_per_stage = 50_000
    config.optim.update(lr=1e-4 if preset == "cifar10" else 2e-4, warmup_steps=0,
                        schedule="linear", ema_decay=0.9999)
    config.train.save_every = 5000
    config.train.log_every = 500
    config.progressive.eval_every = 25_000
  return config


def distribution_matching_config(preset: str = "digits", variant: str = "dmd2"):
  """Defaults of DMD2 / TDM (configs/dmd.py, configs/tdm.py)."""
  config = base_config(preset)
  config.method = "dmd"
  tdm = variant == "tdm"
  config.dmd = ml_collections.ConfigDict(dict(
      variant=variant,
      generator_steps=4 if tdm else 1,
      critic_updates_per_generator=5,   # two time-scales; TDM's paper uses 1:1, which oscillated
                                        # here (docs/results.md): 5:1 is stable for both (digits
                                        # DMD2 with the regression: 2:1)
      t_min=0.02, t_max=0.98,
      critic_lr=1e-4,
      critic_weighting="min_snr" if tdm else "v_mse",   # TDM: x0-MSE x min(SNR, 5)
      regression_weight=0.0, regression_steps=32,     # DMD1 regression to the teacher's ODE from
      regression_pairs=1024,                           # fixed noise, computed before training
                                                       # (K > 1: every step onto its segment)
      regression_source="pairs",   # 'pairs' (those fixed trajectories) or 'data': step k from data
                                   # noised to t_k, the teacher's segment computed online
      gan_weight=0.0,                                  # GAN head on the critic's bottleneck
      huber_c=0.03,                                    # TDM pseudo-Huber constant
      remat=False,                                     # rematerialise the denoiser passes
      unify_steps=(),          # TDM-unify: e.g. (1, 2, 4), one generator told its step count
      step_intervals=tdm,      # TDM: match step k's output only at its noise levels [s_k, t_k]
      step_aware_critic=True,  # K > 1: the critic is told which step made each sample (p_k, not
                               # their mixture); ids over all step counts must fit MAX_STEPS
      eval_steps=(1, 2, 4),
  ))
  config.optim.update(lr=1e-4, warmup_steps=0, schedule="constant", ema_decay=0.99, b1=0.0, b2=0.99)
  config.teacher.sampling_steps = 64
  config.train.update(num_steps=2500 if not tdm else 1500, log_every=50, eval_every=500,
                      save_every=250)
  if preset == "digits":        # sized for ~20 min on 2 CPU cores: few updates, so larger steps
    config.data.batch_size = 32
    config.optim.update(lr=5e-4, schedule="cosine", final_lr_fraction=0.1)
    # regression to the teacher's 16-step DDIM ODE (DMD2: 8192 fixed trajectories): a faster
    # start, a steadier chain
    config.dmd.update(critic_lr=5e-4, regression_steps=16, regression_pairs=8192)
    if tdm:   # TDM's normalised pseudo-Huber gradient is ~30x the regression's at weight 1: at 100
      # the regression along the teacher's trajectory leads and the DM term corrects; from data
      # noised to t_k, not fixed pairs, which it memorised at low noise (results.md, session 10)
      config.dmd.update(regression_weight=100.0, regression_source="data")
      config.train.update(num_steps=5000, eval_every=1000)   # 1000 generator updates
    else:     # 2:1: 1750 generator updates in the time of 1000 at 5:1 (1:1 oscillated); weight 1
      # narrowed the spread between seeds (results.md)
      config.dmd.update(critic_updates_per_generator=2, regression_weight=1.0)
      config.train.update(num_steps=3500, eval_every=700)     # 14 min
    # the final table on 5000 samples: at 1000 one generator's FD spread 22-33 over noise seeds
    config.eval.final_num_samples = 5000
  if preset == "toy2d":
    config.train.update(num_steps=3000 if not tdm else 6000, eval_every=1000 if not tdm else 2000)
  return config


def multi_teacher_config(preset: str = "digits") -> ml_collections.ConfigDict:
  """Defaults of multi-teacher distillation from cached predictions (configs/multi_teacher.py)."""
  config = base_config(preset)
  config.method = "multi_teacher"
  config.cache = ml_collections.ConfigDict(dict(
      dir="",                   # "": <workdir>/cache
      encoder="identity",       # or "package.module:factory" returning a jdistill.data.cache.Encoder
      dtype="float32",          # latents, noise and predictions on disk: float32, float16, bfloat16
      buckets=(config.data.resolution or 8,),   # resolutions (side, or "HxW"); one per batch
      noise_draws=8,            # (t, eps) draws per sample: sample_id = "<index>:<draw>"
      base_seed=0,              # seed = first 32 bits of sha256(f"{sample_id}|{base_seed}")
      records_per_shard=1024,   # latent records per shard (teacher shards: x noise_draws)
      build_batch_size=256,
      skip_existing=True,       # resume a killed build shard by shard
      read_threads=2,           # grain threads reading and batching ahead of the train step
  ))
  config.multi_teacher = ml_collections.ConfigDict(dict(
      # id -> checkpoint (exported .msgpack or Orbax run dir) and weight (normalised to sum 1)
      teachers=ml_collections.ConfigDict(),
      student_init="",          # "": the heaviest teacher (ties: first id); "average" (the teachers'
                                # params averaged with their weights); "random"; or a checkpoint
      loss="mse",               # mse, or huber (of the weighted error, delta huber_delta)
      huber_delta=0.1,
      loss_weighting="v_mse",   # w(logsnr) on ||x_student - x_target||^2 (diffusion/losses.py)
      evaluate_teachers=True,   # FD of every teacher (teacher.sampling_steps) in the summary
  ))
  config.optim.update(lr=2e-4, warmup_steps=50, schedule="cosine", final_lr_fraction=0.1,
                      ema_decay=0.998)
  config.teacher.sampling_steps = 64
  config.eval.update(steps_during_training=(16,), final_steps=(64, 16))
  config.train.update(num_steps=1000, log_every=50, eval_every=500, save_every=250)
  if preset == "digits":        # the bundled teacher and two trained from scratch (configs/multi_teacher.py)
    # different seeds and budgets (16000, 3000, 2000 steps), so their errors are independent; a
    # student from scratch on their averaged prediction beats the mean teacher (docs/results.md)
    config.data.batch_size = 128
    config.cache.noise_draws = 64             # 1297 digits x 64 (t, eps) draws
    config.optim.update(lr=1e-3, warmup_steps=200, final_lr_fraction=0.05, ema_decay=0.998)
    config.multi_teacher.student_init = "random"
    config.train.update(num_steps=4000, eval_every=1000)
    config.multi_teacher.teachers = ml_collections.ConfigDict({
        "base": dict(checkpoint=BUNDLED_DIGITS_TEACHER, weight=1.0),
        "s1": dict(checkpoint="runs/mt_teachers/s1/teacher.msgpack", weight=1.0),
        "s2": dict(checkpoint="runs/mt_teachers/s2/teacher.msgpack", weight=1.0)})
  return config


def _validate_multi_teacher(config, check):
  teachers = config.multi_teacher.teachers
  check(len(teachers) > 0, "multi_teacher.teachers",
        "no teachers; give id -> {checkpoint: ..., weight: ...}")
  for teacher_id in teachers:
    field = f"multi_teacher.teachers.{teacher_id}"
    check(re.fullmatch(r"[A-Za-z0-9_.-]+", teacher_id) is not None, field,
          "an id is letters, digits, '_', '.' and '-' (it names a directory)")
    check(bool(teachers[teacher_id].get("checkpoint")), f"{field}.checkpoint",
          "empty; give a .msgpack or an Orbax run directory")
    weight = teachers[teacher_id].get("weight")
    check(isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0,
          f"{field}.weight", f"must be a number >= 0, got {weight!r}")
  check(sum(teachers[t].weight for t in teachers) > 0, "multi_teacher.teachers",
        "all weights are 0; at least one teacher needs a weight > 0")
  check(config.multi_teacher.loss in ("mse", "huber"), "multi_teacher.loss",
        f"unknown {config.multi_teacher.loss!r}; use mse or huber")
  check(config.multi_teacher.huber_delta > 0, "multi_teacher.huber_delta", "must be > 0")
  check(config.multi_teacher.loss_weighting in WEIGHTINGS, "multi_teacher.loss_weighting",
        f"unknown {config.multi_teacher.loss_weighting!r}; choose one of {WEIGHTINGS}")
  c = config.cache
  check(c.dtype in CACHE_DTYPES, "cache.dtype", f"unknown {c.dtype!r}; choose one of {CACHE_DTYPES}")
  for field in ("noise_draws", "records_per_shard", "build_batch_size", "read_threads"):
    check(c[field] >= 1, f"cache.{field}", f"must be >= 1, got {c[field]}")
  from jdistill.data.cache import CacheError, parse_buckets
  try:
    parse_buckets(c.buckets)
  except CacheError as e:
    raise ConfigError(str(e)) from e


def _validate_distribution_matching(d, check):
  from jdistill.models.unet import MAX_STEPS
  from jdistill.objectives.distribution_matching import REGRESSION_SOURCES, VARIANTS
  check(d.variant in VARIANTS, "dmd.variant", f"unknown {d.variant!r}; choose one of {VARIANTS}")
  check(1 <= d.generator_steps <= MAX_STEPS, "dmd.generator_steps", f"must be in 1..{MAX_STEPS}")
  check(d.critic_updates_per_generator >= 1, "dmd.critic_updates_per_generator", "must be >= 1")
  check(0.0 <= d.t_min < d.t_max <= 1.0, "dmd.t_min", "need 0 <= t_min < t_max <= 1")
  check(d.critic_lr > 0, "dmd.critic_lr", f"must be > 0, got {d.critic_lr}")
  check(d.critic_weighting in WEIGHTINGS, "dmd.critic_weighting",
        f"unknown {d.critic_weighting!r}; choose one of {WEIGHTINGS}")
  check(d.regression_source in REGRESSION_SOURCES, "dmd.regression_source",
        f"unknown {d.regression_source!r}; choose one of {REGRESSION_SOURCES}")
  check(d.regression_weight == 0 or d.regression_source != "pairs" or d.regression_pairs >= 1,
        "dmd.regression_pairs", "must be >= 1 when regression_weight > 0")
  check(d.regression_steps >= 1, "dmd.regression_steps", f"must be >= 1, got {d.regression_steps}")
  check(all(1 <= k <= MAX_STEPS for k in d.unify_steps), "dmd.unify_steps",
        f"step counts must be in 1..{MAX_STEPS}, got {tuple(d.unify_steps)}")
  counts = set(d.unify_steps or (d.generator_steps,))
  check(not d.step_aware_critic or sum(counts) <= MAX_STEPS, "dmd.step_aware_critic",
        f"one id per (K, k) step: the step counts {sorted(counts)} sum to {sum(counts)} > {MAX_STEPS}")


def validate(config, num_devices: int):
  """Fails fast, naming the field, before any compute."""
  def check(ok, field, message):
    if not ok:
      raise ConfigError(f"config.{field}: {message}")

  check(config.diffusion.schedule.name in SCHEDULES, "diffusion.schedule.name",
        f"unknown schedule {config.diffusion.schedule.name!r}; choose one of {SCHEDULES}")
  check(config.diffusion.parameterization in PARAMETERIZATIONS, "diffusion.parameterization",
        f"unknown {config.diffusion.parameterization!r}; choose one of {PARAMETERIZATIONS}")
  check(config.diffusion.loss_weighting in WEIGHTINGS, "diffusion.loss_weighting",
        f"unknown {config.diffusion.loss_weighting!r}; choose one of {WEIGHTINGS}")
  check(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
  check(config.optim.name in ("adam", "adamw"), "optim.name", f"unknown {config.optim.name!r}")
  check(config.optim.schedule in ("constant", "cosine", "linear"), "optim.schedule",
        f"unknown {config.optim.schedule!r}")
  check(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")
  from_scratch = (config.method == "teacher" and not config.teacher.checkpoint) or (
      config.method == "multi_teacher" and config.multi_teacher.student_init == "random")
  init_share = config.optim.ema_decay ** config.train.num_steps   # decay^N: the init's EMA weight
  # (with ema_warmup the first update's decay is 1/10, so the init is all but gone from the EMA)
  warn = from_scratch and not config.optim.ema_warmup and config.train.num_steps > 0
  if warn and init_share > 0.01:
    logging.warning("config.optim.ema_decay=%g over train.num_steps=%d: the final EMA still holds "
                    "%.0f%% of the random initialisation, and it is what gets evaluated and "
                    "exported; use a decay of about %.4f or less", config.optim.ema_decay,
                    config.train.num_steps, 100 * init_share, 0.01 ** (1 / config.train.num_steps))
  check(config.data.batch_size > 0 and config.data.batch_size % num_devices == 0,
        "data.batch_size", f"{config.data.batch_size} is not divisible by the {num_devices} devices")
  check(config.mesh.fsdp >= 1, "mesh.fsdp", f"must be >= 1, got {config.mesh.fsdp}")
  check(num_devices % config.mesh.fsdp == 0, "mesh.fsdp",
        f"{config.mesh.fsdp} does not divide the {num_devices} devices")
  check(config.train.num_steps > 0, "train.num_steps", "must be > 0")
  check(config.train.log_every > 0, "train.log_every", "must be > 0")
  check(config.train.save_every >= 0, "train.save_every", "must be >= 0 (0: only at the end)")
  check(config.train.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
  check(config.model.name in ("unet", "mlp"), "model.name", f"unknown model {config.model.name!r}")
  check(config.optim.accumulate_steps >= 1, "optim.accumulate_steps", "must be >= 1")
  check(config.train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0")
  check(config.curriculum.sampler in ("uniform", "adaptive"), "curriculum.sampler",
        f"unknown {config.curriculum.sampler!r}; use uniform or adaptive")
  check(0 <= config.curriculum.min_weight * config.curriculum.num_regions <= 1,
        "curriculum.min_weight", "must be in [0, 1 / num_regions]")
  check(config.curriculum.update_every >= 1, "curriculum.update_every", "must be >= 1")
  check(config.features.schedule in ("linear", "cosine"), "features.schedule",
        f"unknown {config.features.schedule!r}; use linear or cosine")
  check(config.lora.rank >= 0, "lora.rank", "must be >= 0 (0: off)")
  if "multi_teacher" in config:
    _validate_multi_teacher(config, check)
  if "dmd" in config:
    _validate_distribution_matching(config.dmd, check)
  check(config.eval.features in ("digits", "raw", "inception"), "eval.features",
        f"unknown feature net {config.eval.features!r}")
  check(config.eval.num_samples >= 2, "eval.num_samples", "must be >= 2 (FD needs a covariance)")
  final_count = config.eval.get("final_num_samples", 0)
  check(final_count == 0 or final_count >= 2, "eval.final_num_samples",
        f"must be 0 (= eval.num_samples) or >= 2, got {final_count}")
  source = config.data.source
  check(source in ("digits", "toy2d", "tfds", "image_folder"), "data.source",
        f"unknown source {source!r}; choose digits, toy2d, tfds or image_folder")
  if source == "tfds":
    check(bool(config.data.name), "data.name", "a TFDS dataset name is required (e.g. 'cifar10')")
    import tensorflow_datasets as tfds
    try:
      tfds.builder(config.data.name, data_dir=config.data.data_dir or None)
    except Exception as e:  # noqa: BLE001 - TFDS raises several types for a missing dataset
      raise ConfigError(f"config.data.name: TFDS dataset {config.data.name!r} not found ({e})") from e
  if source == "image_folder":
    import os
    check(os.path.isdir(config.data.path), "data.path", f"{config.data.path!r} is not a directory")
  if config.eval.features == "inception":
    import os
    check(os.path.isfile(config.eval.inception_weights), "eval.inception_weights",
          f"InceptionV3 FID weights file {config.eval.inception_weights!r} not found; "
          "jdistill never downloads weights: pass the path of a file you have")
