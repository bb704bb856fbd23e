"""Reading the caches for training: manifests cross-checked against the config, and a grain
dataset whose batches join each latent with every teacher's prediction (one bucket a batch)."""
from __future__ import annotations

import bisect
import dataclasses
import os
from typing import Optional

import grain
import numpy as np
from absl import logging
from etils import epath

from jdistill import files
from jdistill.data import pipeline, sources
from jdistill.data.cache.format import (LATENTS, CacheError, ShardReader, bucket_name, check_buckets,
                                        derive_seed, fingerprint, read_manifest, sample_id,
                                        teacher_dir)
from jdistill.data.cache.verify import _array_problems
from jdistill.diffusion.schedules import defining_fields


@dataclasses.dataclass(frozen=True)
class TrainingCaches:
  """The latent cache and the teachers' caches (in the order of `teacher_ids`), checked to agree."""
  cache_dir: str
  latents: dict
  teachers: tuple
  teacher_ids: tuple

  @property
  def noise_draws(self):
    return self.teachers[0]["noise_draws"]

  def shape(self, bucket: str):
    return tuple(self.latents["latent_shapes"][bucket])


def open_training_caches(cache_dir: str, teacher_ids, *, buckets, base_seed: int, noise_draws: int,
                         schedule_config: dict, dtype: str,
                         checkpoints: Optional[dict] = None) -> TrainingCaches:
  """Reads and cross-checks the manifests against the config and each other (and, given
  `checkpoints` {teacher id: configured checkpoint}, against the teachers the caches were built
  from), and opens every shard (a missing or truncated one is an error before training starts)."""
  latent_directory = os.path.join(cache_dir, LATENTS)
  latents = read_manifest(latent_directory, "latent cache",
                          "build it with `python -m jdistill.cache build-latents`")
  check_buckets(buckets, latents, latent_directory)
  expected = dict(base_seed=("cache.base_seed", base_seed), noise_draws=("cache.noise_draws", noise_draws),
                  dtype=("cache.dtype", dtype),
                  schedule=("diffusion.schedule", defining_fields(dict(schedule_config))),
                  latents=("", fingerprint(latent_directory)))
  teachers = []
  for teacher_id in teacher_ids:
    directory = teacher_dir(cache_dir, teacher_id)
    manifest = read_manifest(directory, f"cache of teacher {teacher_id!r}",
                             f"build it with `python -m jdistill.cache build-teacher --teacher={teacher_id}`")
    built = dict(manifest, schedule=defining_fields(manifest["schedule"]))
    for key, (field, value) in expected.items():
      if built.get(key) != value:
        if not field:
          raise CacheError(f"{directory} was built from another latent cache: rebuild it")
        raise CacheError(f"config.{field}={value!r} but {directory} was built with {built.get(key)!r}: "
                         "train with the config the caches were built with, or rebuild them")
    if checkpoints is not None:
      _check_teacher(directory, manifest, teacher_id, checkpoints[teacher_id])
    teachers.append(manifest)
  caches = TrainingCaches(cache_dir, latents, tuple(teachers), tuple(teacher_ids))
  reader = ShardReader()
  for path, count in _shard_files(caches):
    reader.open(path, count)
  reader.close()
  return caches


def _check_teacher(directory, manifest, teacher_id, checkpoint):
  """The configured checkpoint is the one the cache was built from: the same bytes (SHA-256) where
  the manifest records them, else the same path. A checkpoint no longer on disk cannot be checked."""
  recorded, recorded_sha256 = manifest.get("checkpoint"), manifest.get("checkpoint_sha256")
  if not epath.Path(checkpoint).exists():
    logging.warning("Teacher %s: %s does not exist, so %s (built from %s) cannot be checked "
                    "against it", teacher_id, checkpoint, directory, recorded)
    return
  if recorded_sha256:
    configured = files.sha256(checkpoint)
    if configured == recorded_sha256:
      return
    found = f"{checkpoint!r} (sha256 {configured[:16]})"
    built = f"{recorded!r} (sha256 {recorded_sha256[:16]})"
  elif checkpoint == recorded:
    return
  else:
    found, built = repr(checkpoint), repr(recorded)
  raise CacheError(
      f"config.multi_teacher.teachers.{teacher_id}.checkpoint={found} but {directory} holds the "
      f"predictions of {built}: rebuild it with `python -m jdistill.cache build-teacher "
      f"--teacher={teacher_id} --config.cache.skip_existing=False`, or point the config back")


def _shard_files(caches):
  draws = caches.noise_draws
  for shard in caches.latents["shards"]:
    yield os.path.join(caches.cache_dir, LATENTS, shard["path"]), shard["num_records"]
    for teacher_id in caches.teacher_ids:
      yield (os.path.join(teacher_dir(caches.cache_dir, teacher_id), shard["path"]),
             shard["num_records"] * draws)


class CachedBucketSource:
  """Random access over one bucket: example i joins record i of every teacher cache with latent
  record i // noise_draws of the same shard. Each record is checked (ids, seeds, shapes, dtypes,
  finiteness, the same noise in every teacher) before it can reach a batch: a bad one raises a
  CacheError naming the file."""

  def __init__(self, caches: TrainingCaches, bucket: str, reader: Optional[ShardReader] = None):
    self.caches, self.bucket = caches, bucket
    self.shape, self.reader = caches.shape(bucket), reader or ShardReader()
    self.shards = [s for s in caches.latents["shards"] if s["bucket"] == bucket]
    draws = caches.noise_draws
    self.ends = list(np.cumsum([s["num_records"] * draws for s in self.shards]))

  def __len__(self):
    return int(self.ends[-1]) if self.ends else 0

  def __getitem__(self, index):
    c, draws = self.caches, self.caches.noise_draws
    k = bisect.bisect_right(self.ends, index)
    shard = self.shards[k]
    j = index - (int(self.ends[k - 1]) if k else 0)
    latent_path = os.path.join(c.cache_dir, LATENTS, shard["path"])
    latent = self.reader.read(latent_path, j // draws, shard["num_records"])
    _raise_on(_array_problems(f"{latent_path}: record {j // draws}", latent, "latent", self.shape,
                              c.latents["dtype"]))
    sid = sample_id(latent.get("sample_id"), j % draws)
    predictions, first = [], None
    for teacher_id, manifest in zip(c.teacher_ids, c.teachers):
      path = os.path.join(teacher_dir(c.cache_dir, teacher_id), shard["path"])
      record = self.reader.read(path, j, shard["num_records"] * draws)
      where = f"{path}: record {j} (sample {sid})"
      found = _array_problems(where, record, "prediction", self.shape, manifest["dtype"])
      found += _array_problems(where, record, "eps", self.shape, manifest["dtype"])
      if record.get("sample_id") != sid or record.get("seed") != derive_seed(sid, manifest["base_seed"]):
        found.append(f"{where}: sample id / seed {record.get('sample_id')!r} / {record.get('seed')} "
                     "does not match its latent record")
      elif not np.isfinite(record.get("t", np.nan)):
        found.append(f"{where}: timestep is {record.get('t')}")
      elif first is not None and not (record["t"] == first["t"] and
                                      np.array_equal(record["eps"], first["eps"])):
        found.append(f"{where}: (t, eps) differ from teacher {c.teacher_ids[0]!r}'s")
      _raise_on(found)
      first = record if first is None else first
      predictions.append(record["prediction"])
    example = {k: np.asarray(v) for k, v in latent["cond"].items()}
    example.update(x=latent["latent"], eps=first["eps"], t=np.float32(first["t"]),
                   teacher_v=np.stack(predictions))
    return example


def _raise_on(problems):
  if problems:
    raise CacheError(problems[0] + "; run `python -m jdistill.cache verify` to list every bad record")


def training_dataset(caches: TrainingCaches, batch_size: int, seed: int, reader=None):
  """An endless grain dataset of batches {x, eps, t, teacher_v (B, K, ...), cond fields}: each bucket
  shuffled, repeated, sharded per process and batched on its own, the buckets mixed in proportion
  to their size; a batch never mixes resolutions. Deterministic; its iterator state checkpoints."""
  reader = reader or ShardReader()
  per_bucket, sizes = [], []
  for k, bucket in enumerate(bucket_name(b) for b in caches.latents["buckets"]):
    source = CachedBucketSource(caches, bucket, reader)
    if len(source):
      per_bucket.append(pipeline.train_dataset(sources.Source(source, source.shape, 0), batch_size,
                                               seed + k))
      sizes.append(len(source))
  if not per_bucket:
    raise CacheError(f"{caches.cache_dir}: the caches hold no records")
  return per_bucket[0] if len(per_bucket) == 1 else grain.MapDataset.mix(per_bucket, sizes)
