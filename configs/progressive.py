"""Progressive distillation (Salimans & Ho 2022).

`--config=configs/progressive.py` distils the bundled digits teacher stage by stage to 1 step on a
CPU. Presets `:cifar10` and `:imagenet64` are the paper's settings (GPU/TPU); give them a teacher
with `--config.teacher.checkpoint=runs/teacher_cifar10`.
"""
import ml_collections

from jdistill.config import base_config


def get_config(preset: str = "digits"):
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
  if preset == "digits":
    config.teacher.sampling_steps = 64
    config.data.batch_size = 128
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
