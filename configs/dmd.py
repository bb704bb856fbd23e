"""DMD2 (Yin et al. 2024): a 1-step generator distilled by distribution matching against the
frozen teacher with a trained fake-score critic. `--config=configs/dmd.py[:preset]`."""
from jdistill.config import distribution_matching_config


def get_config(preset: str = "digits"):
  return distribution_matching_config(preset, "dmd2")
