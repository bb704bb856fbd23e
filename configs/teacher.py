"""Teacher training. `--config=configs/teacher.py[:preset]`, presets: digits (default, CPU),
toy2d, mnist, cifar10, imagenet64 (TFDS; GPU/TPU); `<preset>_flow` on the rectified-flow path;
`<preset>_dit` with a DiT (digits_dit: 2.16M params, the U-Net's 2.25M; the others DiT-S/2)."""
from jdistill.methods import teacher


def get_config(preset: str = "digits"):
  return teacher.get_config(preset)
