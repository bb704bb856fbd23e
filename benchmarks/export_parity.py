"""Exported students sampled in PyTorch against jdistill's own samples.

  python benchmarks/export_parity.py --model=runs/pd/student.msgpack [--model=...]
      --num_samples=1000 [--guidance=W]

For each exported model (a run's .msgpack with its JSON): jdistill.export writes the diffusers
folder; diffusers' DDIMScheduler loop samples it in PyTorch (export.sample_in_diffusers) from the
noise and labels jdistill's sampler draws for seed 0; jdistill samples it as `jdistill.sample`
does. Prints the largest difference of the two sample sets, the FD of each to the test set (the
run's evaluator), and the sampling time of each.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from jdistill import export, sample  # noqa: E402
from jdistill.train import setup, teachers  # noqa: E402

flags.DEFINE_multi_string("model", [], "Exported models (.msgpack with their .json).")
FLAGS = flags.FLAGS             # --num_samples and --guidance: jdistill.sample's flags


def parity(checkpoint: str, num_samples: int, guidance=None) -> dict:
  exported = teachers.read_export(checkpoint)
  config, sampling = sample.config_of_export(exported), exported["sampling"]
  steps, mode, grid = sampling["steps"], sampling.get("mode", "ddim"), sampling.get("grid")
  w = sampling.get("guidance", 0.0) if guidance is None else guidance
  guided = sample.check_guidance(w, config, sampling)
  with tempfile.TemporaryDirectory() as folder:
    exp = setup.build(config, folder, record_config=False)
    params = sample.load_params(exp, checkpoint, guided=guided)
    labels = exp.sampler.labels(num_samples)
    exp.sampler.sample(params, steps, min(num_samples, 500), labels=labels, mode=mode, grid=grid,
                       guidance=w)                                  # compiles
    clock = time.perf_counter()
    ours = exp.sampler.sample(params, steps, num_samples, labels=labels, mode=mode, grid=grid,
                              guidance=w)
    ours_s = time.perf_counter() - clock
    export.export(checkpoint, os.path.join(folder, "diffusers"), guidance if guided else None)
    noise = np.asarray(jax.random.normal(jax.random.key(0), (num_samples, *exp.data_shape)))
    clock = time.perf_counter()
    theirs = export.sample_in_diffusers(os.path.join(folder, "diffusers"), noise, labels)
    theirs_s = time.perf_counter() - clock
    return {"checkpoint": checkpoint, "method": config.method, "steps": steps, "guidance": w,
            "max_abs_diff": float(np.abs(ours - theirs).max()),
            "fd_jdistill": exp.evaluator.fd_of(ours)["fd"],
            "fd_diffusers": exp.evaluator.fd_of(theirs)["fd"],
            "jdistill_s": ours_s, "diffusers_s": theirs_s}


def main(argv):
  del argv
  if not FLAGS.model:
    raise app.UsageError("give --model=MODEL.msgpack (one or more)")
  print("| model | method | steps | w | max abs diff | FD (jdistill) | FD (diffusers) | "
        "jdistill s | PyTorch s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for checkpoint in FLAGS.model:
    r = parity(checkpoint, FLAGS.num_samples, FLAGS.guidance)
    print(f"| {r['checkpoint']} | {r['method']} | {r['steps']} | {r['guidance']:g} | "
          f"{r['max_abs_diff']:.2e} | {r['fd_jdistill']:.2f} | {r['fd_diffusers']:.2f} | "
          f"{r['jdistill_s']:.1f} | {r['diffusers_s']:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
