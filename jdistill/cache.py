"""Teacher-prediction caches for multi-teacher distillation (docs/cache_format.md):

  python -m jdistill.cache build-latents --config=configs/multi_teacher.py --workdir=runs/mt
  python -m jdistill.cache build-teacher --config=configs/multi_teacher.py --teacher=<id> --workdir=runs/mt
  python -m jdistill.cache verify --workdir=runs/mt [--teacher=<id>]

The caches go to `config.cache.dir`, by default `<workdir>/cache` (verify: `--cache_dir` or
`--config` to point elsewhere). Builds are batched, jit-compiled and sharded over this process's
devices; with `--distributed` every process writes its own shards. A rerun resumes a killed build
(`config.cache.skip_existing`). `verify` lists every bad record by file and exits with status 1.
"""
from __future__ import annotations

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jdistill import lock
from jdistill.data import cache as cache_lib
from jdistill.methods import multi_teacher
from jdistill.train import setup

COMMANDS = ("build-latents", "build-teacher", "verify")
config_flags.DEFINE_config_file("config", None, "configs/multi_teacher.py[:preset] (build commands).")
flags.DEFINE_string("workdir", None, "The run directory; the caches go to <workdir>/cache.")
flags.DEFINE_string("teacher", None, "Teacher id (build-teacher: required; verify: default all).")
flags.DEFINE_string("cache_dir", None, "verify: the cache directory (default: from --config or --workdir).")
setup.define_distributed_flags()
FLAGS = flags.FLAGS


def verify(directory: str, teacher_ids=None) -> int:
  """Prints every problem; 0 if there is none, else 1."""
  problems = cache_lib.verify(directory, teacher_ids)
  for line in problems:
    print(line)
  if problems:
    print(f"verify: {len(problems)} problem(s) in {directory}")
    return 1
  print(f"verify: {directory} is complete and sound")
  return 0


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"usage: python -m jdistill.cache {{{','.join(COMMANDS)}}} --workdir=... [flags]")
  command = argv[1]
  setup.initialise_distributed_from_flags()
  config = FLAGS.config
  if command == "verify":
    if not (FLAGS.cache_dir or FLAGS.workdir):
      raise app.UsageError("verify needs --workdir or --cache_dir")
    return verify(FLAGS.cache_dir or multi_teacher.cache_dir(config, FLAGS.workdir),
                  [FLAGS.teacher] if FLAGS.teacher else None)
  if config is None or FLAGS.workdir is None:
    raise app.UsageError(f"{command} needs --config and --workdir")
  if "cache" not in config:
    raise app.UsageError("--config: not a multi-teacher config (no config.cache); "
                         "use configs/multi_teacher.py")
  multi_teacher.validate(config)
  if command == "build-teacher" and FLAGS.teacher not in config.multi_teacher.teachers:
    raise app.UsageError(f"build-teacher needs --teacher=<id>, one of "
                         f"{sorted(config.multi_teacher.teachers)}")
  logging.info("jdistill.cache %s on %d %s device(s), %d process(es)", command, jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  directory = multi_teacher.cache_dir(config, FLAGS.workdir)
  if command == "build-latents":
    with lock.hold(os.path.join(directory, cache_lib.LATENTS), "latent cache"):
      multi_teacher.build_latents_cache(config, FLAGS.workdir)
  else:
    with lock.hold(cache_lib.teacher_dir(directory, FLAGS.teacher), f"cache of teacher {FLAGS.teacher!r}"):
      multi_teacher.build_teacher_cache(config, FLAGS.workdir, FLAGS.teacher)
  return 0


if __name__ == "__main__":
  app.run(main)
