"""Progressive distillation (Salimans & Ho 2022).

`--config=configs/progressive.py` distils the bundled digits teacher stage by stage to 1 step on a
CPU. Presets `:cifar10` and `:imagenet64` take the distillation settings of the paper's released
configs (GPU/TPU): 8192 / 1024 teacher steps, 50k train steps per halving, lr 5e-5 / 1e-4 annealed
linearly, no EMA, no student dropout. They differ from them in the network (jdistill's U-Net, not
the released unet_iddpm) and its output (v, where the released CIFAR model predicts x and the
ImageNet one both x and eps). Give them a teacher with
`--config.teacher.checkpoint=runs/teacher_cifar10`.
"""
from jdistill.methods import progressive


def get_config(preset: str = "digits"):
  return progressive.get_config(preset)
