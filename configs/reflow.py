"""Reflow (Liu et al. 2023; InstaFlow): the teacher's 2-rectified flow on 8192 (noise, sample)
couplings, then its one-step distillation. `--config=configs/reflow.py[:preset]`; the default
`digits_flow` straightens the bundled rectified-flow digits teacher (`digits` a VP teacher)."""
from jdistill.methods import reflow


def get_config(preset: str = "digits_flow"):
  return reflow.get_config(preset)
