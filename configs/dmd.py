"""DMD2 (Yin et al. 2024): a 1-step generator distilled by distribution matching against the
frozen teacher with a trained fake-score critic. `--config=configs/dmd.py[:preset]`."""
from jdistill.methods import distribution_matching


def get_config(preset: str = "digits"):
  return distribution_matching.get_config(preset, "dmd2")
