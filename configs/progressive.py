"""Progressive distillation (Salimans & Ho 2022).

`--config=configs/progressive.py` distils the bundled digits teacher stage by stage to 1 step on a
CPU. Presets `:cifar10` and `:imagenet64` are the paper's settings (GPU/TPU); give them a teacher
with `--config.teacher.checkpoint=runs/teacher_cifar10`.
"""
from jdistill.methods import progressive


def get_config(preset: str = "digits"):
  return progressive.get_config(preset)
