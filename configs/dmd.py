"""DMD2 (Yin et al. 2024): a 1-step generator distilled by distribution matching against the
frozen teacher with a trained fake-score critic. `--config=configs/dmd.py[:preset]`.

The digits default is DMD2 plus DMD1's regression onto the teacher's ODE (weight 1, 8192 pairs) at
2 critic updates per generator update, tuned on this project (docs/results.md). `:<preset>_paper`
(e.g. `:digits_paper`) is DMD2 as published: no regression, 5:1, the GAN head, AdamW (0.9, 0.999)
with weight decay 0.01 (`distribution_matching.paper_recipe`; deviations: docs/architecture.md).
"""
from jdistill.methods import distribution_matching

PAPER = "_paper"


def get_config(preset: str = "digits"):
  if preset and preset.endswith(PAPER):
    return distribution_matching.paper_recipe(
        distribution_matching.get_config(preset[:-len(PAPER)], "dmd2"))
  return distribution_matching.get_config(preset, "dmd2")
