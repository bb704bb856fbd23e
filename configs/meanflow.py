"""MeanFlow (Geng et al. 2025) as distillation: a flow-map student of the teacher sampled in 1 and
2 steps. `--config=configs/meanflow.py[:preset]`; `digits` distils the bundled VP digits teacher,
`digits_flow` the bundled rectified-flow one."""
from jdistill.methods import meanflow


def get_config(preset: str = "digits"):
  return meanflow.get_config(preset)
