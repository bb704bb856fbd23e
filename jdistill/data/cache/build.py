"""Building the caches: the latents (every sample encoded once, grouped by resolution bucket),
then per teacher its predictions on the deterministic noise; `skip_existing` resumes shard by shard."""
from __future__ import annotations

import dataclasses
import importlib
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader

from jdistill import files, partitioning
from jdistill.data.cache.format import (LATENTS, READER_OPTIONS, VERSION, CacheError, ShardReader,
                                        _draw_fn, _write_or_check_manifest, bucket_name,
                                        check_buckets, decode_record, derive_seed, encode_record,
                                        fingerprint, nearest_bucket, parse_buckets, read_manifest,
                                        sample_id, teacher_dir, write_shard)
from jdistill.diffusion.parameterization import forward_process, path_velocity


# ----------------------------------------------------------------------------- encoders

@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen encoder: latents = apply(params, x), x (B, H, W, C) in [-1, 1]. `name` goes into the
  manifest (make it name the weights too)."""
  name: str
  apply: Callable = lambda params, x: x
  params: Any = None


def flax_encoder(name: str, module, params, method: str = "encode") -> Encoder:
  """Wraps a Flax autoencoder: latents = module.apply({'params': params}, x, method=method)."""
  return Encoder(name, lambda p, x: module.apply({"params": p}, x, method=method), params)


def make_encoder(spec: str) -> Encoder:
  """'identity' (pixel-space models), or 'package.module:factory' with factory() -> Encoder."""
  if spec in ("", "identity"):
    return Encoder("identity")
  module, _, attr = spec.partition(":")
  if not attr:
    raise CacheError(f"config.cache.encoder: {spec!r} is not 'identity' or 'package.module:factory'")
  try:
    encoder = getattr(importlib.import_module(module), attr)()
  except (ImportError, AttributeError) as e:
    raise CacheError(f"config.cache.encoder: cannot load {spec!r} ({e})") from e
  if not isinstance(encoder, Encoder):
    raise CacheError(f"config.cache.encoder: {spec!r} returned {type(encoder).__name__}, not an Encoder")
  return encoder


# ----------------------------------------------------------------------------- batched, sharded calls

def map_batches(fn, inputs: dict, batch_size: int, mesh, *args):
  """fn(*args, **batch) over `inputs` (numpy, leading axis = examples) in batches of a fixed size
  (a multiple of the mesh's devices; the last one padded), sharded over the mesh; numpy out."""
  count = len(next(iter(jax.tree.leaves(inputs))))
  devices = mesh.devices.size
  size = -(-batch_size // devices) * devices
  sharding = partitioning.batch_sharding(mesh)
  outputs = []
  for start in range(0, count, size):
    chunk = jax.tree.map(lambda a: a[start:start + size], inputs)
    n = len(next(iter(jax.tree.leaves(chunk))))
    padded = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], size - n, 0)]), chunk)
    out = fn(*args, **jax.device_put(padded, sharding))
    outputs.append(jax.tree.map(lambda a: np.asarray(a)[:n], out))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def _my_shards(shards):
  """Shards of this process: [process_index::process_count]."""
  return shards[jax.process_index()::jax.process_count()]


def _complete(path: str, expected: int) -> bool:
  if not os.path.isfile(path):
    return False
  try:
    reader = ArrayRecordReader(path, READER_OPTIONS)
    count = reader.num_records()
    reader.close()
  except Exception:  # noqa: BLE001 - unreadable: rebuild it
    return False
  return count == expected


def _report(what, done_shards, num_shards, done, total, start, skipped):
  rate = done / max(time.time() - start, 1e-9)
  logging.info("%s: shard %d/%d%s  %d/%d records  %.0f records/s  ETA %s", what, done_shards,
               num_shards, " (exists, skipped)" if skipped else "", done, total, rate,
               files.hms((total - done) / max(rate, 1e-9)))


def _build_shards(what, directory, shards, make_records, skip_existing):
  """Writes this process's shards (skipping complete ones when resuming), logging progress."""
  mine = _my_shards(shards)
  total, done, start = sum(s["num_records"] for s in mine), 0, time.time()
  for k, shard in enumerate(mine):
    path = os.path.join(directory, shard["path"])
    skipped = skip_existing and _complete(path, shard["num_records"])
    if not skipped:
      write_shard(path, make_records(shard))
    done += shard["num_records"]
    _report(what, k + 1, len(mine), done, total, start, skipped)


# ----------------------------------------------------------------------------- the latent cache

def source_resolutions(source) -> list:
  """(h, w) of every record; a fixed `data_shape` answers without reading the records."""
  if source.data_shape is not None:
    if len(source.data_shape) != 3:
      raise CacheError(f"caches hold images (H, W, C); this data has shape {tuple(source.data_shape)}")
    return [tuple(source.data_shape[:2])] * len(source.records)
  return [tuple(np.shape(source.records[i]["x"])[:2]) for i in range(len(source.records))]


def plan_latents(source, buckets, records_per_shard: int) -> list:
  """Shards of (bucket, source indices): samples grouped by their nearest bucket, in index order."""
  members = {b: [] for b in buckets}
  for index, resolution in enumerate(source_resolutions(source)):
    members[nearest_bucket(resolution, buckets)].append(index)
  shards = []
  for bucket in buckets:
    indices = members[bucket]
    count = -(-len(indices) // records_per_shard)
    for k in range(count):
      part = indices[k * records_per_shard:(k + 1) * records_per_shard]
      shards.append(dict(path=f"{bucket_name(bucket)}/{k:05d}-of-{count:05d}.array_record",
                         bucket=bucket_name(bucket), num_records=len(part),
                         sample_ids=[str(i) for i in part]))
  return shards


def _fit(x, bucket):
  """x resized to the bucket's resolution (unchanged when it already is)."""
  x = np.asarray(x, np.float32)
  if tuple(x.shape[:2]) == tuple(bucket):
    return x
  return np.asarray(jax.image.resize(x, (*bucket, x.shape[-1]), "linear", antialias=True))


def build_latents(source, cache_dir: str, *, encoder: Encoder, buckets, dtype: str = "float32",
                  records_per_shard: int = 1024, batch_size: int = 256, skip_existing: bool = True,
                  mesh=None, data: Optional[dict] = None) -> dict:
  """Encodes every sample of `source` once into `cache_dir/latents` (one file set per bucket),
  stored with its conditioning (every field of the record but 'x'). Returns the manifest."""
  buckets = parse_buckets(buckets)
  directory = os.path.join(cache_dir, LATENTS)
  mesh = mesh or partitioning.local_mesh()
  shards = plan_latents(source, buckets, records_per_shard)
  first = {s["bucket"]: source.records[int(s["sample_ids"][0])] for s in reversed(shards)}
  latent_shapes = {
      name: list(jax.eval_shape(encoder.apply, encoder.params,
                                jax.ShapeDtypeStruct((1, *parse_buckets(name)[0],
                                                      np.shape(r["x"])[-1]), jnp.float32)).shape[1:])
      for name, r in first.items()}
  manifest = _write_or_check_manifest(directory, dict(
      format="jdistill.latents", version=VERSION, encoder=encoder.name, dtype=dtype,
      buckets=[list(b) for b in buckets], data=data or {}, latent_shapes=latent_shapes,
      num_records=len(source.records), shards=shards), skip_existing)
  encode = jax.jit(lambda params, x: encoder.apply(params, x).astype(dtype))

  def records(shard):
    bucket = parse_buckets(shard["bucket"])[0]
    examples = [source.records[int(i)] for i in shard["sample_ids"]]
    x = np.stack([_fit(e["x"], bucket) for e in examples])
    latents = map_batches(encode, {"x": x}, batch_size, mesh, encoder.params)
    for sid, example, latent in zip(shard["sample_ids"], examples, latents):
      cond = {k: np.asarray(v) for k, v in example.items() if k != "x"}
      yield encode_record(dict(sample_id=sid, resolution=list(bucket), cond=cond, latent=latent))

  _build_shards(f"latents ({encoder.name})", directory, manifest["shards"], records, skip_existing)
  return manifest


# ----------------------------------------------------------------------------- teacher caches

PREDICTIONS = {"vp": "v", "flow": "flow_v"}     # what a record's `prediction` is, per path

def _teacher_fn(denoiser, schedule, dtype):
  """jit: the teacher's velocity on z_t = alpha_t x + sigma_t eps (eps as stored), in its path's
  terms: the VP v, or the flow velocity eps - x."""
  def predict(params, x, t, eps, cond):
    z_t, logsnr = forward_process(x.astype(jnp.float32), t, eps.astype(jnp.float32), schedule)
    label = cond.get("label") if denoiser.num_classes else None
    prediction = denoiser.predict(params, z_t, logsnr, label)
    return path_velocity(prediction, denoiser.path).astype(dtype)
  return jax.jit(predict)


def build_teacher(cache_dir: str, teacher_id: str, *, denoiser, params, schedule, buckets,
                  base_seed: int, noise_draws: int, checkpoint: str = "", schedule_config=None,
                  dtype: Optional[str] = None, batch_size: int = 256, skip_existing: bool = True,
                  mesh=None) -> dict:
  """Caches one teacher's predictions for `noise_draws` (t, eps) draws of every latent: teacher
  shard k mirrors latent shard k, record j <-> latent record j // noise_draws, draw j % noise_draws.
  Stored in the latents' dtype (`dtype`, if given, must be it). `params` must be placed on `mesh`
  (replicated or FSDP). The manifest records `checkpoint` and its SHA-256, so training on another
  teacher is caught. Returns the manifest."""
  latent_directory = os.path.join(cache_dir, LATENTS)
  latents = read_manifest(latent_directory, "latent cache",
                          "build it first with `python -m jdistill.cache build-latents`")
  check_buckets(buckets, latents, latent_directory)
  directory = teacher_dir(cache_dir, teacher_id)
  if dtype not in (None, latents["dtype"]):
    raise CacheError(f"config.cache.dtype={dtype!r} but {latent_directory} holds {latents['dtype']}: "
                     "one cache, one dtype (rebuild the latents or set it back)")
  dtype = latents["dtype"]
  mesh = mesh or partitioning.local_mesh()
  manifest = _write_or_check_manifest(directory, dict(
      format="jdistill.teacher", version=VERSION, teacher=teacher_id, checkpoint=str(checkpoint),
      checkpoint_sha256=files.sha256(checkpoint) if checkpoint else "",
      prediction=PREDICTIONS[denoiser.path], parameterization=denoiser.parameterization,
      schedule=dict(schedule_config or {"name": schedule.name}), dtype=dtype, base_seed=base_seed,
      noise_draws=noise_draws, buckets=latents["buckets"], latents=fingerprint(latent_directory),
      shards=[dict(path=s["path"], bucket=s["bucket"], num_records=s["num_records"] * noise_draws)
              for s in latents["shards"]]), skip_existing)
  predict = _teacher_fn(denoiser, schedule, dtype)
  reader = ShardReader()

  def records(shard):
    latent_path = os.path.join(latent_directory, shard["path"])
    rows = [decode_record(data, f"{latent_path}: record {j}") for j, data in
            enumerate(reader.read_raw(latent_path, shard["num_records"] // noise_draws))]
    ids = [sample_id(r["sample_id"], d) for r in rows for d in range(noise_draws)]
    seeds = np.array([derive_seed(i, base_seed) for i in ids], np.uint32)
    x = np.repeat(np.stack([r["latent"] for r in rows]), noise_draws, 0)
    cond = {k: np.repeat(np.stack([np.asarray(r["cond"][k]) for r in rows]), noise_draws, 0)
            for k in rows[0]["cond"]}
    t, eps = map_batches(_draw_fn(x.shape[1:], dtype), {"seed": seeds}, batch_size, mesh)
    v = map_batches(predict, dict(x=x, t=t, eps=eps, cond=cond), batch_size, mesh, params)
    for j, sid in enumerate(ids):
      yield encode_record(dict(
          sample_id=sid, seed=int(seeds[j]), t=np.float32(t[j]),
          resolution=rows[j // noise_draws]["resolution"], cond={k: c[j] for k, c in cond.items()},
          eps=eps[j], prediction=v[j]))

  try:
    _build_shards(f"teacher {teacher_id}", directory, manifest["shards"], records, skip_existing)
  finally:
    reader.close()
  return manifest
