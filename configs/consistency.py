"""Consistency distillation: sCD (Lu & Song 2025; default) or the classic discrete CD baseline
(Song et al. 2023; `consistency.variant='cd'`), 1- and 2-step samplers.
`--config=configs/consistency.py[:preset]`: `digits` and `toy2d` (each also `_flow`) run sCD on the
bundled teacher, `cd` runs CD on digits."""
from jdistill.methods import consistency


def get_config(preset: str = "digits"):
  return consistency.get_config(preset)
