"""Checking the caches: every problem of the latent cache and the teacher caches, one line each."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from jdistill import partitioning
from jdistill.data.cache.build import map_batches
from jdistill.data.cache.format import (LATENTS, TEACHERS, CacheError, ShardReader, _draw_fn,
                                        decode_record, derive_seed, fingerprint, read_manifest,
                                        sample_id, teacher_dir)


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
  """The decoded records of a shard (None for each unreadable or undecodable one, a problem each);
  a missing, truncated or short shard is one problem and no records."""
  try:
    reader.open(path, expected)
  except CacheError as e:
    problems.append(str(e))
    return []
  try:
    raw = reader.read_raw(path, expected)
  except CacheError:            # corrupt bytes somewhere: read record by record to name each
    raw = [_or_problem(problems, reader.read_bytes, path, j, expected) for j in range(expected)]
  return [None if data is None else _or_problem(problems, decode_record, data, f"{path}: record {j}")
          for j, data in enumerate(raw)]


def _or_problem(problems, fn, *args):
  """fn(*args), or None with its CacheError added to `problems`."""
  try:
    return fn(*args)
  except CacheError as e:
    problems.append(str(e))
    return None


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
