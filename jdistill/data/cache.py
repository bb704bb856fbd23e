"""Caches for multi-teacher distillation: the data encoded once (latents), then per teacher its
predictions on deterministic noise, so a student trains on many teachers without holding them.

  seed(sample_id) = first 32 bits (big-endian) of SHA-256(f"{sample_id}|{base_seed}")
  key = jax.random.key(seed);  t ~ U(0, 1) from split(key)[0],  eps ~ N(0, I) from split(key)[1]
  z_t = alpha_t x + sigma_t eps;  stored: v_hat = alpha_t eps_hat - sigma_t x_hat (Prediction.v)

Every teacher sees the same (t, eps) for the same sample, and a cache rebuilds bit for bit. Shards
are ArrayRecord files (group_size 1, uncompressed) of msgpack records, written under a tmp name
and renamed (a killed build leaves no half file); `skip_existing` resumes shard by shard. A batch
comes from one resolution bucket. Layout and schema: docs/cache_format.md.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import threading
import time
from typing import Any, Callable, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from flax import serialization

from jdistill import files, partitioning
from jdistill.data import pipeline, sources
from jdistill.diffusion.parameterization import forward_process
from jdistill.files import hms

LATENTS, TEACHERS, MANIFEST = "latents", "teachers", "manifest.json"
VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
WRITER_OPTIONS = "group_size:1,uncompressed"         # one record per chunk: a read is one pread
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"   # random access


class CacheError(RuntimeError):
  """A cache is missing, incomplete, corrupt, or was built with another config (names the file)."""


# ----------------------------------------------------------------------------- seeds and noise

def derive_seed(sample_id: str, base_seed: int) -> int:
  """First 32 bits (big-endian) of SHA-256(f"{sample_id}|{base_seed}")."""
  return int.from_bytes(hashlib.sha256(f"{sample_id}|{base_seed}".encode()).digest()[:4], "big")


def draw_t_eps(seeds, shape):
  """Per example: (t ~ U(0, 1), eps ~ N(0, I) of `shape`) from jax.random.key(seed)."""
  def one(seed):
    key_t, key_eps = jax.random.split(jax.random.key(seed))
    return jax.random.uniform(key_t, ()), jax.random.normal(key_eps, shape)
  return jax.vmap(one)(seeds)


@functools.lru_cache(maxsize=None)
def _draw_fn(shape, dtype):
  """jit: seeds (uint32) -> (t float32, eps in the storage dtype); one program for build and verify."""
  def draw(seed):
    t, eps = draw_t_eps(seed, shape)
    return t, eps.astype(dtype)
  return jax.jit(draw)


def sample_id(latent_id: str, draw: int) -> str:
  return f"{latent_id}:{draw}"


# ----------------------------------------------------------------------------- records and shards

def encode_record(record: dict) -> bytes:
  """A record (str / int / list / numpy leaves) as msgpack (flax.serialization: arrays keep dtype)."""
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes, where: str) -> dict:
  try:
    record = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 - msgpack raises several types on garbage
    raise CacheError(f"{where}: undecodable record ({type(e).__name__}: {e})") from e
  if not isinstance(record, dict):
    raise CacheError(f"{where}: not a record (decoded to {type(record).__name__})")
  return record


def write_shard(path: str, records):
  """Writes encoded `records` to `<path>.tmp`, then renames it onto `path` (atomic)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
  try:
    for record in records:
      writer.write(record)
  finally:
    writer.close()
  os.replace(tmp, path)


class ShardReader:
  """Random access to shards: each file opened once (lazily, thread-safe) and checked against the
  record count its manifest promises, so a truncated or partly written shard is an error."""

  def __init__(self):
    self._readers, self._lock = {}, threading.Lock()

  def open(self, path: str, expected: int):
    with self._lock:
      reader = self._readers.get(path)
      if reader is None:
        if not os.path.isfile(path):
          raise CacheError(f"{path}: missing shard ({expected} records expected); rebuild it")
        try:
          reader = ArrayRecordReader(path, READER_OPTIONS)
          count = reader.num_records()
        except Exception as e:  # noqa: BLE001
          raise CacheError(f"{path}: unreadable shard ({e}); rebuild it") from e
        if count != expected:
          raise CacheError(f"{path}: has {count} records, its manifest says {expected} (truncated "
                           "or records missing); rebuild it")
        self._readers[path] = reader
      return reader

  def read(self, path: str, index: int, expected: int) -> dict:
    data = self.open(path, expected).read([index])[0]
    return decode_record(data, f"{path}: record {index}")

  def read_raw(self, path: str, expected: int) -> list:
    return self.open(path, expected).read(0, expected)

  def close(self):
    with self._lock:
      for reader in self._readers.values():
        reader.close()
      self._readers.clear()


# ----------------------------------------------------------------------------- manifests, buckets

def read_manifest(directory: str, what: str, hint: str = "") -> dict:
  manifest = files.read_json(os.path.join(directory, MANIFEST))
  if manifest is None:
    raise CacheError(f"no {what} in {directory} (no {MANIFEST}){': ' + hint if hint else ''}")
  return manifest


def fingerprint(directory: str) -> str:
  """SHA-256 (16 hex digits) of a cache's manifest: ties teacher caches to their latent cache."""
  with open(os.path.join(directory, MANIFEST), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def _write_or_check_manifest(directory: str, manifest: dict, skip_existing: bool):
  """Writes the build's manifest first; resuming over one built with other settings is an error."""
  manifest = json.loads(json.dumps(manifest))
  existing = files.read_json(os.path.join(directory, MANIFEST))
  if existing is not None and existing != manifest:
    changed = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
    if skip_existing:
      raise CacheError(f"{directory} was built with other settings ({', '.join(changed)}): delete "
                       "it, or rebuild it with --config.cache.skip_existing=False")
    logging.warning("Rebuilding %s (changed: %s)", directory, ", ".join(changed))
  os.makedirs(directory, exist_ok=True)
  files.write_json(os.path.join(directory, MANIFEST), manifest)
  return manifest


def parse_buckets(spec) -> list:
  """config.cache.buckets -> [(h, w), ...]: ints are square sides, strings 'HxW' (e.g. (8, '16x8'))."""
  items = [spec] if isinstance(spec, (int, str)) else list(spec)
  buckets = []
  for item in items:
    try:
      h, w = (item, item) if isinstance(item, int) else (int(v) for v in str(item).lower().split("x"))
    except ValueError as e:
      raise CacheError(f"config.cache.buckets: {item!r} is not a side or 'HxW'") from e
    if h < 1 or w < 1:
      raise CacheError(f"config.cache.buckets: {item!r} must be positive")
    buckets.append((h, w))
  if not buckets or len(set(buckets)) != len(buckets):
    raise CacheError(f"config.cache.buckets: need distinct resolutions, got {spec!r}")
  return buckets


def bucket_name(resolution) -> str:
  return f"{resolution[0]}x{resolution[1]}"


def nearest_bucket(resolution, buckets):
  """The bucket closest in log-area to `resolution` (exact match first; ties to the larger)."""
  area = resolution[0] * resolution[1]
  return min(buckets, key=lambda b: (tuple(b) != tuple(resolution), abs(math.log(area / (b[0] * b[1]))),
                                     -b[0] * b[1]))


def check_buckets(config_buckets, manifest: dict, directory: str):
  """Building and training must use the same buckets (a batch comes from one bucket)."""
  mine = [list(b) for b in parse_buckets(config_buckets)]
  if mine != manifest["buckets"]:
    fmt = lambda bs: "(" + ", ".join(bucket_name(b) for b in bs) + ")"
    raise CacheError(f"config.cache.buckets={fmt(mine)} but {directory} was built with buckets "
                     f"{fmt(manifest['buckets'])}: build and train with the same buckets (set "
                     "--config.cache.buckets to the cache's, or rebuild the caches)")


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
               hms((total - done) / max(rate, 1e-9)))


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

def teacher_dir(cache_dir: str, teacher_id: str) -> str:
  return os.path.join(cache_dir, TEACHERS, teacher_id)


def _teacher_fn(denoiser, schedule, dtype):
  """jit: the teacher's v-prediction on z_t = alpha_t x + sigma_t eps (eps as stored)."""
  def predict(params, x, t, eps, cond):
    z_t, logsnr = forward_process(x.astype(jnp.float32), t, eps.astype(jnp.float32), schedule)
    label = cond.get("label") if denoiser.num_classes else None
    return denoiser.predict(params, z_t, logsnr, label).v.astype(dtype)
  return jax.jit(predict)


def build_teacher(cache_dir: str, teacher_id: str, *, denoiser, params, schedule, buckets,
                  base_seed: int, noise_draws: int, checkpoint: str = "", schedule_config=None,
                  dtype: Optional[str] = None, batch_size: int = 256, skip_existing: bool = True,
                  mesh=None) -> dict:
  """Caches one teacher's predictions for `noise_draws` (t, eps) draws of every latent: teacher
  shard k mirrors latent shard k, record j <-> latent record j // noise_draws, draw j % noise_draws.
  Stored in the latents' dtype (`dtype`, if given, must be it). `params` must be placed on `mesh`
  (replicated or FSDP). Returns the manifest."""
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
      prediction="v", parameterization=denoiser.parameterization,
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


# ----------------------------------------------------------------------------- verify

def verify(cache_dir: str, teacher_ids: Optional[Sequence[str]] = None) -> list:
  """Every problem of the latent cache and the teacher caches (default: all), one line each naming
  the file and record: completeness against the latent cache, shapes, dtypes, NaN/Inf, and seeds,
  timesteps and noise recomputed from the sample ids. Empty list: the caches are sound. Reads one
  shard (of every cache) at a time."""
  latent_directory = os.path.join(cache_dir, LATENTS)
  try:
    latents = read_manifest(latent_directory, "latent cache")
  except CacheError as e:
    return [str(e)]
  teachers_root = os.path.join(cache_dir, TEACHERS)
  if teacher_ids is None:
    teacher_ids = sorted(os.listdir(teachers_root)) if os.path.isdir(teachers_root) else []
  problems, teachers = [], {}
  for teacher_id in teacher_ids:
    directory = teacher_dir(cache_dir, teacher_id)
    try:
      teachers[teacher_id] = read_manifest(directory, f"cache of teacher {teacher_id!r}")
    except CacheError as e:
      problems.append(str(e))
      continue
    if teachers[teacher_id].get("latents") != fingerprint(latent_directory):
      problems.append(f"{directory}: built from another latent cache (rebuild it)")
  reader = ShardReader()
  for shard in latents["shards"]:
    path = os.path.join(latent_directory, shard["path"])
    shape = latents["latent_shapes"][shard["bucket"]]
    rows = _read_all(reader, path, shard["num_records"], problems)
    for j, (sid, row) in enumerate(zip(shard["sample_ids"], rows)):
      if row is not None:
        where = f"{path}: record {j} (sample {sid})"
        if row.get("sample_id") != sid:
          problems.append(f"{where}: sample_id is {row.get('sample_id')!r}")
        problems += _array_problems(where, row, "latent", shape, latents["dtype"])
    for teacher_id, manifest in teachers.items():
      problems += _verify_teacher_shard(teacher_dir(cache_dir, teacher_id), manifest, shard, shape,
                                        rows, reader)
  reader.close()
  return problems


def _read_all(reader, path, expected, problems):
  """The decoded records of a shard (None for each undecodable one); a missing, truncated or short
  shard is one problem and no records."""
  try:
    raw = reader.read_raw(path, expected)
  except CacheError as e:
    problems.append(str(e))
    return []
  rows = []
  for j, data in enumerate(raw):
    try:
      rows.append(decode_record(data, f"{path}: record {j}"))
    except CacheError as e:
      problems.append(str(e))
      rows.append(None)
  return rows


def _array_problems(where, record, key, shape, dtype):
  value = record.get(key)
  if not isinstance(value, np.ndarray):
    return [f"{where}: no array '{key}'"]
  if list(value.shape) != list(shape):
    return [f"{where}: '{key}' has shape {list(value.shape)}, expected {list(shape)}"]
  if value.dtype != np.dtype(jnp.dtype(dtype)):
    return [f"{where}: '{key}' has dtype {value.dtype}, expected {dtype}"]
  if not np.all(np.isfinite(value.astype(np.float32))):
    return [f"{where}: '{key}' has NaN/Inf"]
  return []


def _verify_teacher_shard(directory, manifest, latent_shard, shape, latent_rows, reader):
  """Problems of one teacher shard: its records against the latent shard they mirror, and against
  the seed, timestep and noise recomputed from each sample id."""
  draws, dtype = manifest["noise_draws"], manifest["dtype"]
  path = os.path.join(directory, latent_shard["path"])
  expected = latent_shard["num_records"] * draws
  listed = {s["path"]: s["num_records"] for s in manifest["shards"]}
  if listed.get(latent_shard["path"]) != expected:
    return [f"{path}: its manifest does not list it with the {expected} records the latent cache needs"]
  problems = []
  records = _read_all(reader, path, expected, problems)
  if not records:
    return problems
  ids = [sample_id(sid, d) for sid in latent_shard["sample_ids"] for d in range(draws)]
  seeds = np.array([derive_seed(i, manifest["base_seed"]) for i in ids], np.uint32)
  t, eps = map_batches(_draw_fn(tuple(shape), dtype), {"seed": seeds}, 1024, partitioning.local_mesh())
  for j, record in enumerate(records):
    if record is None:
      continue
    where = f"{path}: record {j} (sample {ids[j]})"
    problems += _array_problems(where, record, "prediction", shape, dtype)
    eps_problems = _array_problems(where, record, "eps", shape, dtype)
    problems += eps_problems
    if record.get("sample_id") != ids[j]:
      problems.append(f"{where}: sample_id is {record.get('sample_id')!r}")
    if record.get("seed") != int(seeds[j]):
      problems.append(f"{where}: seed {record.get('seed')} != {int(seeds[j])} (SHA-256 of the sample id)")
    if not isinstance(record.get("t"), np.floating) or np.float32(record["t"]) != t[j]:
      problems.append(f"{where}: timestep {record.get('t')} != {t[j]} drawn from the seed")
    if not eps_problems and not np.array_equal(record["eps"], eps[j]):
      problems.append(f"{where}: noise differs from the noise drawn from the seed")
    latent = latent_rows[j // draws] if j // draws < len(latent_rows) else None
    if latent is not None and (record.get("resolution") != latent.get("resolution") or
                               not _same_cond(record.get("cond"), latent.get("cond"))):
      problems.append(f"{where}: resolution or conditioning differs from its latent record")
  return problems


def _same_cond(a, b):
  return (isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
          and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a))


# ----------------------------------------------------------------------------- training source

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
                         schedule_config: dict, dtype: str) -> TrainingCaches:
  """Reads and cross-checks the manifests against the config and each other, and opens every shard
  (a missing or truncated one is an error before training starts)."""
  latent_directory = os.path.join(cache_dir, LATENTS)
  latents = read_manifest(latent_directory, "latent cache",
                          "build it with `python -m jdistill.cache build-latents`")
  check_buckets(buckets, latents, latent_directory)
  expected = dict(base_seed=("cache.base_seed", base_seed), noise_draws=("cache.noise_draws", noise_draws),
                  dtype=("cache.dtype", dtype), schedule=("diffusion.schedule", dict(schedule_config)),
                  latents=("", fingerprint(latent_directory)))
  teachers = []
  for teacher_id in teacher_ids:
    directory = teacher_dir(cache_dir, teacher_id)
    manifest = read_manifest(directory, f"cache of teacher {teacher_id!r}",
                             f"build it with `python -m jdistill.cache build-teacher --teacher={teacher_id}`")
    for key, (field, value) in expected.items():
      if manifest.get(key) != value:
        if not field:
          raise CacheError(f"{directory} was built from another latent cache: rebuild it")
        raise CacheError(f"config.{field}={value!r} but {directory} was built with {manifest.get(key)!r}: "
                         "train with the config the caches were built with, or rebuild them")
    teachers.append(manifest)
  caches = TrainingCaches(cache_dir, latents, tuple(teachers), tuple(teacher_ids))
  reader = ShardReader()
  for path, count in _shard_files(caches):
    reader.open(path, count)
  reader.close()
  return caches


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
