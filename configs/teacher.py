"""Teacher training. `--config=configs/teacher.py[:preset]`, presets: digits (default, CPU),
toy2d, mnist, cifar10, imagenet64 (TFDS; GPU/TPU)."""
from jdistill.config import base_config


def get_config(preset: str = "digits"):
  config = base_config(preset)
  config.method = "teacher"
  return config
