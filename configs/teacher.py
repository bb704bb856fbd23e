"""Teacher training. `--config=configs/teacher.py[:preset]`, presets: digits (default, CPU),
toy2d, mnist, cifar10, imagenet64 (TFDS; GPU/TPU)."""
from jdistill.methods import teacher


def get_config(preset: str = "digits"):
  return teacher.get_config(preset)
