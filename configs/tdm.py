"""TDM (Luo et al. 2025): a 4-step generator trained by trajectory distribution matching.
`--config=configs/tdm.py[:preset]`.

The default variant 'tdm' is the paper's objective: each step's trajectory state
z_s = alpha_s x_hat + sigma_s eps_hat diffused forward to t in [s, t_k], the fake score's loss
importance-weighted, pseudo-Huber c = 1e-3. `:<preset>_fresh_noise` (e.g. `:digits_fresh_noise`)
is the project's earlier variant 'tdm_fresh_noise': x_hat diffused with fresh noise to t in
[s_k, t_k] (DMD2 per step), c = 0.03. The digits preset adds the regression along the teacher's
trajectory from noised data (weight 100) to either (docs/results.md).
"""
from jdistill.methods import distribution_matching

FRESH_NOISE = "_fresh_noise"


def get_config(preset: str = "digits"):
  if preset and preset.endswith(FRESH_NOISE):
    return distribution_matching.get_config(preset[:-len(FRESH_NOISE)], "tdm_fresh_noise")
  return distribution_matching.get_config(preset, "tdm")
