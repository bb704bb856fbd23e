"""TDM (Luo et al. 2025): a 4-step generator trained by trajectory distribution matching.
`--config=configs/tdm.py[:preset]`."""
from jdistill.methods import distribution_matching


def get_config(preset: str = "digits"):
  return distribution_matching.get_config(preset, "tdm")
