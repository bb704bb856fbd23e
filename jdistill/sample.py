"""Draw samples from a trained run or an exported model.

  python -m jdistill.sample --checkpoint=MODEL.msgpack [--num_steps=N] --num_samples=M --out=FILE.npz
  python -m jdistill.sample --workdir=DIR [--checkpoint=PATH] [--num_steps=N] ...
      [--mode=ddim|ancestral|renoise|flowmap] [--fd [--fd_repeats=R]]

Writes `samples` (images: uint8 NHWC in 0..255; 2-D data: float32 (M, 2)) and `labels` to FILE.npz,
and a PNG grid next to it; with --fd, also prints their FD against the held-out split in the run's
feature space (re-measure any checkpoint at a larger sample count).

An exported model (.msgpack plus the .json every method writes next to it) is enough on its own:
the JSON holds the model, diffusion and data config and how the model samples (mode, steps, and
the time grid of a progressive student, used unless --num_steps asks for another count). With
--workdir the config is the run's config.json and the params default to the run's exported model
(progressive: its last finished stage's student); --checkpoint may also name an Orbax checkpoints
directory or a run directory.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from jdistill import methods
from jdistill.config import base_config, student_guidance_range
from jdistill.eval import evaluate as eval_lib
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import setup, teachers

flags.DEFINE_string("workdir", None, "A run directory (holds config.json).")
flags.DEFINE_string("checkpoint", None, "An exported .msgpack, a checkpoints dir or a run dir "
                    "(default: the run's exported model).")
flags.DEFINE_integer("num_steps", None, "Sampling steps (default: the exported model's).",
                     lower_bound=1)
flags.DEFINE_integer("num_samples", 100, "How many samples.", lower_bound=1)
flags.DEFINE_string("out", "samples.npz", "Output .npz path (a PNG grid is written next to it).")
flags.DEFINE_integer("seed", 0, "Noise seed.", lower_bound=0)
flags.DEFINE_enum("mode", None, ["ddim", "euler", "ancestral", "renoise", "flowmap"],
                  "Sampler: DDIM (= Euler on a flow's velocity), DDPM ancestral, re-noising or a flow "
                  "map's steps (flowmap: MeanFlow); re-noising for DMD2 generators and "
                  "consistency models. Default: the "
                  "exported model's, else the method's.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight w: told to a guided "
                   "student (one pass per step), two-pass CFG for a class-conditional teacher. "
                   "Default: the exported model's; else config.diffusion.guidance for a teacher "
                   "run, 0 for other distilled students (they learned unguided targets or the "
                   "guided distribution itself).",
                   lower_bound=0.0)
flags.DEFINE_bool("fd", False, "Also print the samples' FD against the held-out split (config.eval.features).")
flags.DEFINE_integer("fd_repeats", 1, "With --fd: FD for this many noise seeds (--seed onwards), "
                     "and their mean.", lower_bound=1)
flags.register_validator("out", lambda out: out.endswith(".npz") and os.path.isdir(
    os.path.dirname(os.path.abspath(out))), "--out must be a .npz file in an existing directory")
flags.register_multi_flags_validator(
    ["fd", "num_samples"], lambda f: not f["fd"] or f["num_samples"] >= 2,
    "--fd needs --num_samples >= 2 (FD needs a covariance)")
FLAGS = flags.FLAGS


def default_checkpoint(workdir: str, config) -> str:
  """The run's exported model; else its last finished progressive stage's; else its checkpoints."""
  export = os.path.join(workdir, methods.get(config.method).EXPORT)
  if epath.Path(export).exists():
    return export
  stages = epath.Path(workdir) / "stages"
  if stages.is_dir():
    done = sorted((p for p in stages.iterdir()
                   if (p / "checkpoints").is_dir() and p.name.split("_")[0].isdigit()),
                  key=lambda p: int(p.name.split("_")[0]))
    if done:
      return str(done[-1] / "checkpoints")
  return os.path.join(workdir, "checkpoints")


def config_of_export(exported: dict):
  """A config that rebuilds an exported model: the shared defaults with its JSON's sections."""
  config = teachers.with_export_sections(base_config(), exported)
  config.method = exported.get("method", "teacher")
  return config


def load_params(exp, checkpoint: str, flow_map: bool = False, guided: bool = False):
  """The params to sample; `flow_map`: a flow map's (its interval embedding too); `guided`: a
  guidance-conditioned student's (its guidance embedding too)."""
  abstract = exp.abstract_params(flow_map, guided)
  if checkpoint.endswith(".msgpack"):
    return teachers.load_exported(checkpoint, abstract)
  if (epath.Path(checkpoint) / "checkpoints").is_dir():
    checkpoint = os.path.join(checkpoint, "checkpoints")
  return ckpt_lib.restore_params(checkpoint, abstract,
                                 key=methods.get(exp.config.method).PARAMS_KEY)


def check_guidance(guidance: float, config, sampling: dict) -> bool:
  """Whether the model is a guidance-conditioned student (told w, one pass). A w != 0 for a model
  trained for neither that nor two-pass CFG (a class-conditional teacher with label dropout) is a
  UsageError."""
  guided = bool(sampling.get("guided")) or bool(student_guidance_range(config))
  cfg_teacher = (config.method == "teacher" and config.model.num_classes > 0
                 and config.diffusion.label_dropout > 0)
  if guidance and not (guided or cfg_teacher):
    raise app.UsageError(
        f"--guidance={guidance:g}: this {config.method} model was trained for neither one-pass "
        "guidance (a guided student: configs/guided.py) nor classifier-free guidance (a class-"
        "conditional teacher trained with label dropout); sample it with --guidance=0")
  return guided


def main(argv):
  del argv
  if not (FLAGS.workdir or FLAGS.checkpoint):
    raise app.UsageError("give --checkpoint=MODEL.msgpack (an exported model) or --workdir=RUN")
  exported = teachers.read_export(FLAGS.checkpoint) if (FLAGS.checkpoint or "").endswith(".msgpack") else None
  if FLAGS.workdir:
    config_path = epath.Path(FLAGS.workdir) / "config.json"
    if not config_path.exists():
      raise app.UsageError(f"--workdir={FLAGS.workdir}: no config.json; is it a jdistill run directory?")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    checkpoint = FLAGS.checkpoint or default_checkpoint(FLAGS.workdir, config)
    if exported is None and checkpoint.endswith(".msgpack"):
      exported = teachers.read_export(checkpoint)
  elif exported is None:
    raise app.UsageError(f"--checkpoint={FLAGS.checkpoint}: no {FLAGS.checkpoint[:-8]}.json next "
                         "to it (an exported model); give --workdir of the run that made it")
  else:
    config, checkpoint = config_of_export(exported), FLAGS.checkpoint
  sampling = (exported or {}).get("sampling", {})
  num_steps = FLAGS.num_steps or sampling.get("steps")
  if not num_steps:
    raise app.UsageError("--num_steps is required (this checkpoint does not say how it samples)")
  mode = FLAGS.mode or sampling.get("mode") or methods.get(config.method).sampling_mode(config)
  grid = sampling.get("grid") if num_steps == sampling.get("steps") else None
  guidance = FLAGS.guidance
  if guidance is None:
    guidance = sampling.get("guidance", config.diffusion.guidance if config.method == "teacher" else 0.0)
  guided = check_guidance(guidance, config, sampling)
  workdir = FLAGS.workdir or os.path.dirname(os.path.abspath(checkpoint))
  exp = setup.build(config, workdir, evaluator=FLAGS.fd, record_config=False)
  logging.info("Sampling %d x %d steps (%s, %s grid) from %s", FLAGS.num_samples, num_steps, mode,
               "uniform" if grid is None else "the exported", checkpoint)
  params = load_params(exp, checkpoint, flow_map=mode == "flowmap", guided=guided)

  def draw(seed):
    labels = exp.sampler.labels(FLAGS.num_samples, seed)
    return exp.sampler.sample(params, num_steps, FLAGS.num_samples, seed, labels=labels,
                              mode=mode, grid=grid, guidance=guidance), labels

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
      print(f"{checkpoint}: {num_steps} steps ({mode}), {FLAGS.num_samples} samples, seed "
            f"{seed}: " + "  ".join(f"{k} {v:.4g}" for k, v in result.items()), flush=True)
    if len(fds) > 1:
      print(f"fd mean {np.mean(fds):.4g} std {np.std(fds):.2g} over seeds {FLAGS.seed}.."
            f"{FLAGS.seed + len(fds) - 1}")


if __name__ == "__main__":
  app.run(main)
