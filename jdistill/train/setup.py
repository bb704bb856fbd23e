"""What every method builds from its config: mesh, data, denoiser, schedule, writer, evaluator."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from clu import metric_writers
from etils import epath

from jdistill import config as config_lib
from jdistill.data import pipeline, sources
from jdistill.diffusion.schedules import make_schedule, path_of
from jdistill.eval.evaluate import FDEvaluator, Sampler
from jdistill.models.denoiser import make_denoiser
from jdistill.objectives import state as state_lib
from jdistill import partitioning, resume


@dataclasses.dataclass
class Experiment:
  config: Any
  workdir: str
  mesh: Any
  train_source: Any
  test_source: Any
  denoiser: Any
  schedule: Any
  writer: Any
  sampler: Sampler
  evaluator: FDEvaluator

  @property
  def data_shape(self):
    return tuple(self.train_source.data_shape)

  def train_data(self, seed_offset: int = 0):
    c = self.config
    return pipeline.train_dataset(self.train_source, c.data.batch_size, c.seed + seed_offset,
                                  flip=c.data.flip)

  def optimizer(self, optim=None):
    return state_lib.make_optimizer(optim or self.config.optim)

  def abstract_params(self, flow_map: bool = False, guided: bool = False):
    """Shape/dtype/sharding of the denoiser's params on this mesh (for restoring teachers);
    `flow_map`: with the interval embedding of a flow map (MeanFlow students); `guided`: with the
    guidance embedding of a guidance-conditioned student."""
    from jdistill.train.checkpoint import abstract_with_shardings
    import flax.linen as nn
    boxed = jax.eval_shape(lambda: self.denoiser.init(jax.random.key(0),
                                                      jnp.zeros((1, *self.data_shape)),
                                                      flow_map=flow_map, guided=guided)["params"])
    return abstract_with_shardings(nn.unbox(boxed), partitioning.shardings_for(boxed, self.mesh))

  def param_shardings(self, guided: bool = False):
    return jax.tree.map(lambda a: a.sharding, self.abstract_params(guided=guided))


def build(config, workdir: str, *, evaluator: bool = True, record_config: bool = True) -> Experiment:
  config_lib.validate(config, jax.device_count())
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if record_config:
    from jdistill.files import write_text
    write_text(f"{workdir}/config.json", config.to_json_best_effort(indent=2))
  mesh = partitioning.make_mesh(config.mesh.fsdp)
  train_source = sources.load_split(config.data, "train")
  test_source = sources.load_split(config.data, "test")
  if config.model.num_classes and config.model.num_classes != train_source.num_classes:
    logging.warning("config.model.num_classes=%d but the data has %d classes",
                    config.model.num_classes, train_source.num_classes)
  denoiser = make_denoiser(config.model, train_source.data_shape, config.diffusion.parameterization,
                           path_of(config.diffusion.schedule), config.diffusion.schedule,
                           config.train.get("remat", "none"))
  schedule = make_schedule(config.diffusion.schedule)
  resumed = any(epath.Path(workdir).glob("events.out.tfevents.*"))
  # a tool run (sampling, caching: record_config=False) leaves no event file in the run directory
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0 or not record_config)
  sampler = Sampler(denoiser, schedule, train_source.data_shape, clip_x=config.diffusion.clip_x,
                    batch_size=config.eval.batch_size)
  if record_config and not resumed:        # once per run directory, on disk before a kill
    writer.write_hparams(flat_hparams(config.to_dict()))
    writer.flush()
  fd = None
  if evaluator:
    fd = FDEvaluator(sampler, test_source, config.eval.features, config.eval.num_samples,
                     config.eval.inception_weights, final_num_samples=config.eval.get("final_num_samples", 0),
                     training_source=train_source,
                     neighbour_examples=config.eval.get("neighbour_examples", 0))
  return Experiment(config, workdir, mesh, train_source, test_source, denoiser, schedule, writer,
                    sampler, fd)


def define_distributed_flags():
  """--distributed and its explicit settings, shared by the jdistill.main and jdistill.cache CLIs."""
  from absl import flags
  flags.DEFINE_bool("distributed", False, "Initialise jax.distributed (multi-process / multi-host).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (with --distributed).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --distributed).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --distributed).")


def initialise_distributed_from_flags():
  """With --distributed: jax.distributed.initialize() (auto-detected on TPU pods / SLURM, or the
  explicit flags); CPU collectives use gloo."""
  from absl import flags
  f = flags.FLAGS
  if not f.distributed:
    return
  if f.coordinator_address and jax.config.jax_platforms in (None, "", "cpu"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f.coordinator_address,
                             num_processes=f.num_processes, process_id=f.process_id)


def flat_hparams(tree):
  """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}; tuples become strings (TensorBoard hparams)."""
  return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
          for key, value in resume.flatten(tree).items()}
