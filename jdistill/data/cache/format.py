"""The on-disk format of the teacher-prediction caches: seeds and noise, records, shards,
manifests, resolution buckets and the directory layout (docs/cache_format.md).

  seed(sample_id) = first 32 bits (big-endian) of SHA-256(f"{sample_id}|{base_seed}")
  key = jax.random.key(seed);  t ~ U(0, 1) from split(key)[0],  eps ~ N(0, I) from split(key)[1]
  z_t = alpha_t x + sigma_t eps;  stored: v_hat = alpha_t eps_hat - sigma_t x_hat (Prediction.v)

Shards are ArrayRecord files (group_size 1, uncompressed) of msgpack records, written under a tmp
name and renamed (a killed build leaves no half file).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading

import jax
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from flax import serialization

from jdistill import files

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
    return decode_record(self.read_bytes(path, index, expected), f"{path}: record {index}")

  def read_bytes(self, path: str, index: int, expected: int) -> bytes:
    """Record `index` undecoded; a corrupt one is a CacheError naming the file and record."""
    reader = self.open(path, expected)
    try:
      return reader.read([index])[0]
    except Exception as e:  # noqa: BLE001 - riegeli raises RuntimeError, others on odd damage
      raise CacheError(f"{path}: record {index}: unreadable ({e}); rebuild the shard") from e

  def read_raw(self, path: str, expected: int) -> list:
    """Every record undecoded; a corrupt one is a CacheError (`read_bytes` names which)."""
    reader = self.open(path, expected)
    try:
      return reader.read(0, expected)
    except Exception as e:  # noqa: BLE001
      raise CacheError(f"{path}: unreadable records ({e}); rebuild the shard") from e

  def close(self):
    with self._lock:
      for reader in self._readers.values():
        reader.close()
      self._readers.clear()


# ----------------------------------------------------------------------------- manifests, buckets

def read_manifest(directory: str, what: str, hint: str = "") -> dict:
  """The manifest in `directory`, its shard paths checked to stay inside `directory`."""
  path = os.path.join(directory, MANIFEST)
  try:
    manifest = files.read_json(path)
  except ValueError as e:
    raise CacheError(f"{path}: unreadable manifest ({e}); rebuild the cache") from e
  if manifest is None:
    raise CacheError(f"no {what} in {directory} (no {MANIFEST}){': ' + hint if hint else ''}")
  for shard in manifest.get("shards", []):
    _check_shard_path(directory, path, shard.get("path") if isinstance(shard, dict) else shard)
  return manifest


def _check_shard_path(directory: str, manifest_path: str, shard_path):
  """A shard path is relative, without '..', and resolves inside the manifest's directory."""
  inside = (isinstance(shard_path, str) and shard_path and not os.path.isabs(shard_path)
            and ".." not in shard_path.split("/"))
  if inside:
    root = os.path.realpath(directory)
    inside = os.path.commonpath([root, os.path.realpath(os.path.join(root, shard_path))]) == root
  if not inside:
    raise CacheError(f"{manifest_path}: shard path {shard_path!r} is not a relative path inside "
                     f"{directory} (absolute, '..' or a link out); rebuild the cache")


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


# ----------------------------------------------------------------------------- directory layout

def teacher_dir(cache_dir: str, teacher_id: str) -> str:
  return os.path.join(cache_dir, TEACHERS, teacher_id)
