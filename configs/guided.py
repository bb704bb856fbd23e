"""Guided distillation (Meng et al., CVPR 2023): a class-conditional teacher's classifier-free
guidance distilled into one guidance-conditioned student (stage 1), whose steps progressive
distillation then halves with every target at the example's w (stage 2). One student samples at
any w in one pass per step: `python -m jdistill.sample --workdir=RUN --guidance=2`.
`--config=configs/guided.py` runs it from the bundled class-conditional digits teacher
(`configs/teacher.py:digits_cond`); `:digits_cond_flow` from a flow-matching one."""
from jdistill.methods import guided


def get_config(preset: str = "digits_cond"):
  return guided.get_config(preset)
