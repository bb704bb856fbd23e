"""jdistill command line: `python -m jdistill.main --config=configs/<method>.py[:preset] --workdir=DIR`.

Every config field can be overridden: `--config.optim.lr=1e-4`. `--distributed` calls
`jax.distributed.initialize()` (multi-host TPU pods, SLURM GPU clusters, or explicit
--coordinator_address/--num_processes/--process_id).
"""
from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jdistill import lock, methods
from jdistill.train import setup

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/<method>.py[:preset]).")
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and summaries go.")
setup.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

class _QuietLibraries:
  """Keeps Orbax's per-save chatter out of the training log (warnings still show)."""
  def filter(self, record):
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  setup.initialise_distributed_from_flags()
  config = FLAGS.config
  if config.method not in methods.METHODS:
    raise app.UsageError(f"config.method: unknown method {config.method!r}; choose one of "
                         f"{sorted(methods.METHODS)}")
  methods.validate(config, jax.device_count())
  logging.info("jdistill %s on %d %s device(s), %d process(es)", config.method, jax.device_count(),
               jax.devices()[0].platform, jax.process_count())
  with lock.hold(FLAGS.workdir):
    methods.get(config.method).train(config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
