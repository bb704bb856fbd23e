"""Draw samples from a trained run.

  python -m jdistill.sample --workdir=DIR [--checkpoint=PATH] --num_steps=N --num_samples=M --out=FILE.npz
      [--mode=ddim|ancestral|renoise] [--fd [--fd_repeats=R]]

Writes `samples` (images: uint8 NHWC in 0..255; 2-D data: float32 (M, 2)) and `labels` to FILE.npz,
and a PNG grid next to it; with --fd, also prints their FD against the held-out split in the run's
feature space (re-measure any checkpoint at a larger sample count). The model comes from
DIR/config.json; the params from --checkpoint (an Orbax checkpoints dir, a run dir, or an exported
.msgpack), by default the run's latest student (progressive: its last stage) or its teacher.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

flags.DEFINE_string("workdir", None, "A run directory (holds config.json).")
flags.DEFINE_string("checkpoint", None, "Checkpoints dir, run dir or .msgpack (default: the run's latest).")
flags.DEFINE_integer("num_steps", None, "Sampling steps.")
flags.DEFINE_integer("num_samples", 100, "How many samples.")
flags.DEFINE_string("out", "samples.npz", "Output .npz path (a PNG grid is written next to it).")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_enum("mode", None, ["ddim", "ancestral", "renoise"],
                  "Sampler: DDIM, DDPM ancestral, or re-noising (DMD2 generators). Default: renoise "
                  "for a DMD2 run, else DDIM.")
flags.DEFINE_bool("fd", False, "Also print the samples' FD against the held-out split (config.eval.features).")
flags.DEFINE_integer("fd_repeats", 1, "With --fd: FD for this many noise seeds (--seed onwards), and their mean.")
flags.mark_flags_as_required(["workdir", "num_steps"])
FLAGS = flags.FLAGS


def default_checkpoint(workdir: str) -> str:
  stages = epath.Path(workdir) / "stages"
  if stages.is_dir():
    done = sorted((p for p in stages.iterdir() if (p / "checkpoints").is_dir()),
                  key=lambda p: int(p.name.split("_")[0]))
    if done:
      return str(done[-1] / "checkpoints")
  return os.path.join(workdir, "checkpoints")


def load_params(exp, checkpoint: str):
  from jdistill.train import checkpoint as ckpt_lib
  from jdistill.train.teacher import load_exported
  if checkpoint.endswith(".msgpack"):
    return load_exported(checkpoint, exp.abstract_params())
  if (epath.Path(checkpoint) / "checkpoints").is_dir():
    checkpoint = os.path.join(checkpoint, "checkpoints")
  key = "generator/ema_params" if exp.config.method == "dmd" else "ema_params"
  return ckpt_lib.restore_params(checkpoint, exp.abstract_params(), key=key)


def main(argv):
  del argv
  from jdistill.eval import evaluate as eval_lib
  from jdistill.train import setup
  config_path = epath.Path(FLAGS.workdir) / "config.json"
  if not config_path.exists():
    raise app.UsageError(f"--workdir={FLAGS.workdir}: no config.json; is it a jdistill run directory?")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  exp = setup.build(config, FLAGS.workdir, evaluator=FLAGS.fd, record_config=False)
  checkpoint = FLAGS.checkpoint or default_checkpoint(FLAGS.workdir)
  logging.info("Sampling %d x %d steps from %s", FLAGS.num_samples, FLAGS.num_steps, checkpoint)
  params = load_params(exp, checkpoint)
  mode = FLAGS.mode or ("renoise" if config.get("dmd", {}).get("variant") == "dmd2" else "ddim")

  def draw(seed):
    labels = None
    if exp.denoiser.num_classes:
      labels = np.random.RandomState(seed).randint(0, exp.denoiser.num_classes, FLAGS.num_samples)
    return exp.sampler.sample(params, FLAGS.num_steps, FLAGS.num_samples, seed, labels=labels,
                              mode=mode), labels

  samples, labels = draw(FLAGS.seed)
  stored = eval_lib.to_uint8(samples) if samples.ndim == 4 else samples.astype(np.float32)
  np.savez(FLAGS.out, samples=stored, labels=np.zeros(0) if labels is None else labels)
  png = os.path.splitext(FLAGS.out)[0] + ".png"
  eval_lib.save_png(eval_lib.image_grid(samples), png)
  print(f"wrote {FLAGS.out} ({stored.shape}, {stored.dtype}) and {png}")
  if FLAGS.fd:                # FD's spread over noise seeds is large at small counts: repeat
    fds = []
    for seed in range(FLAGS.seed, FLAGS.seed + FLAGS.fd_repeats):
      result = exp.evaluator.fd_of(samples if seed == FLAGS.seed else draw(seed)[0])
      fds.append(result["fd"])
      print(f"{checkpoint}: {FLAGS.num_steps} steps ({mode}), {FLAGS.num_samples} samples, seed "
            f"{seed}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    if len(fds) > 1:
      print(f"fd mean {np.mean(fds):.4g} std {np.std(fds):.2g} over seeds {FLAGS.seed}.."
            f"{FLAGS.seed + len(fds) - 1}")


if __name__ == "__main__":
  app.run(main)
