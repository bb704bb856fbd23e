"""Adaptive timestep curriculum on one digits progressive stage (the bundled teacher's 8 DDIM
steps -> a 4-step student), and its ablation preset `:uniform` with the same budget.

  python -m jdistill.main --config=configs/curriculum.py --workdir=runs/curriculum
  python -m jdistill.main --config=configs/curriculum.py:uniform --workdir=runs/uniform
  python benchmarks/curriculum_ablation.py        # both, several seeds, curves + table

`:adaptive_flow` and `:uniform_flow` run the same from the bundled rectified-flow teacher.
"""
from jdistill.methods import progressive


def get_config(preset: str = "adaptive"):
  sampler = preset.removesuffix("_flow")           # `adaptive_flow`: from the rectified-flow teacher
  if sampler not in ("adaptive", "uniform"):
    raise ValueError(f"config preset: use 'adaptive' or 'uniform' (each also '<preset>_flow'), "
                     f"got {preset!r}")
  config = progressive.get_config("digits_flow" if preset.endswith("_flow") else "digits")
  config.progressive.update(steps="8,4", steps_per_stage=400, stage_overrides="", eval_every=25,
                            best_metric="val_loss")
  config.curriculum.update(sampler=sampler, num_regions=3, temperature=1.0, min_weight=0.1,
                           update_every=25, smoothing=0.9)
  config.eval.num_samples = 1000
  return config
