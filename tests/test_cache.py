"""Teacher-prediction caches: seeds by hand, the same noise for every teacher, kill + resume ==
unbroken (bytes), verify finds truncated / NaN / missing records (CLI exits non-zero), resolution
buckets never mix and must match between build and train, an 8-device build == a 1-device build."""
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from jdistill.data import cache as cache_lib
from jdistill.data import pipeline, sources
from jdistill.models.denoiser import make_denoiser
from jdistill.diffusion.schedules import make_schedule
from jdistill.methods import multi_teacher

from conftest import tiny_multi_teacher_config, tiny_teacher_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
SHARD = "8x8/00001-of-00006.array_record"


def records(path):
  reader = ArrayRecordReader(path)
  rows = [cache_lib.decode_record(r, path) for r in reader.read_all()]
  reader.close()
  return rows


def files(directory):
  """{relative path: bytes} of every file under `directory`."""
  return {os.path.relpath(p, directory): open(p, "rb").read()
          for p in sorted(glob.glob(os.path.join(directory, "**", "*"), recursive=True))
          if os.path.isfile(p)}


def copy_workdir(teacher_cache, tmp_path, teachers=("a", "b")):
  """A copy of the session cache's workdir: latents and the given teachers' caches."""
  config, workdir = teacher_cache
  copy = str(tmp_path / "copy")
  shutil.copytree(os.path.join(workdir, "cache", "latents"), os.path.join(copy, "cache", "latents"))
  for teacher_id in teachers:
    shutil.copytree(cache_lib.teacher_dir(os.path.join(workdir, "cache"), teacher_id),
                    cache_lib.teacher_dir(os.path.join(copy, "cache"), teacher_id))
  return config, copy


# ----------------------------------------------------------------------------- seeds and noise

def test_seed_is_the_first_32_bits_of_sha256():
  digest = hashlib.sha256(b"12:3|7").digest()
  assert cache_lib.derive_seed("12:3", 7) == int.from_bytes(digest[:4], "big")
  assert cache_lib.derive_seed("12:3", 8) != cache_lib.derive_seed("12:3", 7)


def test_every_teacher_sees_the_same_seeded_noise_and_timestep(teacher_cache):
  config, workdir = teacher_cache
  cache = os.path.join(workdir, "cache")
  latents = cache_lib.read_manifest(os.path.join(cache, "latents"), "latents")
  assert latents["num_records"] == 1297 and len(latents["shards"]) == 6
  a, b = (records(os.path.join(cache_lib.teacher_dir(cache, i), SHARD)) for i in ("a", "b"))
  assert len(a) == len(b) == 2 * 256
  latent_ids = latents["shards"][1]["sample_ids"]
  for j, (ra, rb) in enumerate(zip(a, b)):
    expected_id = f"{latent_ids[j // 2]}:{j % 2}"
    digest = hashlib.sha256(f"{expected_id}|{config.cache.base_seed}".encode()).digest()
    assert ra["sample_id"] == rb["sample_id"] == expected_id
    assert ra["seed"] == rb["seed"] == int.from_bytes(digest[:4], "big")
    assert ra["t"] == rb["t"] and np.array_equal(ra["eps"], rb["eps"])
    assert ra["resolution"] == [8, 8] and ra["eps"].shape == ra["prediction"].shape == (8, 8, 1)
  # the noise and timestep really are the ones drawn from the seed, and they vary
  seeds = np.array([r["seed"] for r in a], np.uint32)
  t, eps = jax.jit(lambda s: cache_lib.draw_t_eps(s, (8, 8, 1)))(seeds)
  np.testing.assert_array_equal(np.array([r["t"] for r in a]), t)
  np.testing.assert_array_equal(np.stack([r["eps"] for r in a]), eps)
  assert np.std(t) > 0.2
  # different teachers, different predictions
  assert np.mean(np.abs(np.stack([r["prediction"] for r in a]) - np.stack([r["prediction"] for r in b]))) > 1e-2


# ----------------------------------------------------------------------------- atomic, resumable builds

class _Killed(Exception):
  pass


def test_killed_build_resumes_to_the_same_bytes(teacher_cache, tmp_path, monkeypatch):
  config, workdir = copy_workdir(teacher_cache, tmp_path, teachers=())
  writes = {"n": 0}
  real_writer = cache_lib.format.ArrayRecordWriter

  class DyingWriter(real_writer):
    def write(self, data):
      writes["n"] += 1
      if writes["n"] > 2 * 512 + 100:        # two shards done, the third 100 records in
        raise _Killed()
      super().write(data)

  monkeypatch.setattr(cache_lib.format, "ArrayRecordWriter", DyingWriter)
  with pytest.raises(_Killed):
    multi_teacher.build_teacher_cache(config, workdir, "a")
  directory = cache_lib.teacher_dir(os.path.join(workdir, "cache"), "a")
  assert sorted(os.path.relpath(p, directory) for p in glob.glob(f"{directory}/8x8/*.array_record")) == [
      "8x8/00000-of-00006.array_record", SHARD]         # no half file under a final name
  assert os.path.exists(f"{directory}/8x8/00002-of-00006.array_record.tmp")
  monkeypatch.setattr(cache_lib.format, "ArrayRecordWriter", real_writer)
  multi_teacher.build_teacher_cache(config, workdir, "a")      # skip_existing: resumes
  unbroken = cache_lib.teacher_dir(os.path.join(teacher_cache[1], "cache"), "a")
  assert files(directory) == files(unbroken)          # the killed shard's tmp file is gone too


def test_resume_skips_complete_shards(teacher_cache, tmp_path, monkeypatch):
  config, workdir = copy_workdir(teacher_cache, tmp_path, teachers=("a",))
  os.remove(os.path.join(cache_lib.teacher_dir(os.path.join(workdir, "cache"), "a"), SHARD))
  written = []
  real = cache_lib.write_shard
  monkeypatch.setattr(cache_lib.build, "write_shard", lambda path, recs: (written.append(path), real(path, recs)))
  multi_teacher.build_teacher_cache(config, workdir, "a")
  assert [os.path.relpath(p, os.path.join(workdir, "cache", "teachers", "a")) for p in written] == [SHARD]


# ----------------------------------------------------------------------------- verify

def _rewrite(path, edit):
  rows = edit(records(path))
  cache_lib.write_shard(path, [cache_lib.encode_record(r) for r in rows])


def test_verify_lists_truncated_nan_and_missing_records(teacher_cache, tmp_path):
  config, workdir = copy_workdir(teacher_cache, tmp_path)
  cache = os.path.join(workdir, "cache")
  assert cache_lib.verify(cache) == []
  a, b = (cache_lib.teacher_dir(cache, i) for i in ("a", "b"))
  truncated = os.path.join(a, "8x8/00002-of-00006.array_record")
  with open(truncated, "r+b") as f:
    f.truncate(os.path.getsize(truncated) // 2)

  def nan_record(rows):
    rows[7]["prediction"] = np.full_like(rows[7]["prediction"], np.nan)
    rows[9]["t"] = np.float32(rows[9]["t"] + 0.01)            # a timestep not drawn from its seed
    return rows
  nan_shard = os.path.join(b, SHARD)
  _rewrite(nan_shard, nan_record)
  short_shard = os.path.join(b, "8x8/00004-of-00006.array_record")
  _rewrite(short_shard, lambda rows: rows[:-1])              # a missing record

  problems = cache_lib.verify(cache)
  assert len(problems) == 4, problems
  assert any(p.startswith(truncated) and "records" in p for p in problems)
  assert any(p.startswith(f"{nan_shard}: record 7 ") and "NaN" in p for p in problems)
  assert any(p.startswith(f"{nan_shard}: record 9 ") and "timestep" in p for p in problems)
  assert any(p.startswith(short_shard) and "511 records" in p for p in problems)
  assert all(a not in p for p in cache_lib.verify(cache, ["b"]))

  result = subprocess.run([sys.executable, "-m", "jdistill.cache", "verify", f"--workdir={workdir}"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  for path in (truncated, nan_shard, short_shard):
    assert path in result.stdout


def test_verify_finds_a_missing_teacher_shard_and_cache(teacher_cache, tmp_path):
  config, workdir = copy_workdir(teacher_cache, tmp_path, teachers=("a",))
  cache = os.path.join(workdir, "cache")
  missing = os.path.join(cache_lib.teacher_dir(cache, "a"), SHARD)
  os.remove(missing)
  problems = cache_lib.verify(cache, ["a", "b"])
  assert any(p.startswith(missing) and "missing" in p for p in problems)
  assert any("teacher 'b'" in p for p in problems)


def test_verify_names_every_unreadable_record_and_goes_on(teacher_cache, tmp_path):
  config, workdir = copy_workdir(teacher_cache, tmp_path)
  cache = os.path.join(workdir, "cache")
  truncated = os.path.join(cache_lib.teacher_dir(cache, "a"), SHARD)
  with open(truncated, "r+b") as f:
    f.truncate(100)
  garbled = os.path.join(cache_lib.teacher_dir(cache, "b"), SHARD)
  with open(garbled, "r+b") as f:
    for offset in (100, 20000, 150000):                    # inside records 0, ~30 and ~230
      f.seek(offset)
      f.write(bytes(40))
  reader = ArrayRecordReader(garbled, cache_lib.READER_OPTIONS)
  unreadable = []
  for j in range(2 * 256):
    try:
      reader.read([j])
    except RuntimeError:
      unreadable.append(j)
  reader.close()
  assert len(unreadable) == 3, unreadable

  problems = cache_lib.verify(cache)
  assert len(problems) == 4, problems
  assert any(p.startswith(f"{truncated}: has 0 records") for p in problems)
  assert [p.split(" (")[0] for p in problems if p.startswith(garbled)] == [
      f"{garbled}: record {j}: unreadable" for j in unreadable]


def _craft_manifest(cache, shard_path):
  path = os.path.join(cache, "latents", cache_lib.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest["shards"][0]["path"] = shard_path
  with open(path, "w") as f:
    json.dump(manifest, f)
  return path


def test_a_manifest_cannot_point_outside_its_cache(teacher_cache, tmp_path):
  config, workdir = copy_workdir(teacher_cache, tmp_path, teachers=())
  cache = os.path.join(workdir, "cache")
  os.symlink(str(tmp_path), os.path.join(cache, "latents", "out"))
  for shard_path in ("../../../escaped.array_record", str(tmp_path / "escaped.array_record"),
                     "out/escaped.array_record"):
    manifest = _craft_manifest(cache, shard_path)
    message = f"{manifest}: shard path {shard_path!r} is not a relative path inside"
    assert [p for p in cache_lib.verify(cache) if p.startswith(message)] == cache_lib.verify(cache) != []
    with pytest.raises(cache_lib.CacheError, match=re.escape(message)):
      multi_teacher.build_teacher_cache(config, workdir, "a")
    with pytest.raises(cache_lib.CacheError, match=re.escape(message)):
      multi_teacher.open_caches(config, workdir, ("a",))
    assert not glob.glob(str(tmp_path / "**" / "escaped*"), recursive=True)
    assert not os.path.exists(cache_lib.teacher_dir(cache, "a"))


# ----------------------------------------------------------------------------- resolution buckets

def _two_resolution_source():
  """12 images of 8x8, 12 of 16x16 (interleaved) and one 12x12 (nearest bucket: 16x16)."""
  rng = np.random.RandomState(0)
  rows = [{"x": rng.uniform(-1, 1, (8 if i % 2 else 16,) * 2 + (1,)).astype(np.float32),
           "label": np.int32(i % 10)} for i in range(24)]
  rows.append({"x": rng.uniform(-1, 1, (12, 12, 1)).astype(np.float32), "label": np.int32(3)})
  return sources.Source(rows, None, 10)


@pytest.fixture(scope="module")
def bucketed_cache(tmp_path_factory):
  """Latents in buckets (8, 16), stored as bfloat16, and one teacher whose U-Net fits both (no
  attention by resolution)."""
  cache = str(tmp_path_factory.mktemp("buckets"))
  config = tiny_multi_teacher_config(cache)
  config.model.attention_resolutions = ()
  cache_lib.build_latents(_two_resolution_source(), cache, encoder=cache_lib.Encoder("identity"),
                          buckets=(8, 16), dtype="bfloat16", records_per_shard=5, batch_size=8)
  cache_lib.build_teacher(cache, "a", denoiser=make_denoiser(config.model, (8, 8, 1), "v"),
                          params=tiny_teacher_params(config, 0),
                          schedule=make_schedule(config.diffusion.schedule), buckets=(8, 16),
                          base_seed=0, noise_draws=2,
                          schedule_config=config.diffusion.schedule.to_dict(), batch_size=8)
  return cache, config


def test_a_batch_never_mixes_resolutions(bucketed_cache):
  cache, config = bucketed_cache
  latents = cache_lib.read_manifest(os.path.join(cache, "latents"), "latents")
  by_bucket = {s["bucket"]: [] for s in latents["shards"]}
  for s in latents["shards"]:
    by_bucket[s["bucket"]] += s["sample_ids"]
  assert sorted(by_bucket) == ["16x16", "8x8"] and "24" in by_bucket["16x16"]   # 12x12 -> 16x16
  assert latents["latent_shapes"] == {"8x8": [8, 8, 1], "16x16": [16, 16, 1]}
  assert cache_lib.verify(cache) == []
  caches = cache_lib.open_training_caches(cache, ["a"], buckets=(8, 16), base_seed=0, noise_draws=2,
                                          schedule_config=config.diffusion.schedule.to_dict(),
                                          dtype="bfloat16")
  iterator = pipeline.make_iterator(cache_lib.training_dataset(caches, 4, seed=0))
  seen = set()
  for _ in range(30):
    batch = next(iterator)
    resolution = batch["x"].shape[1:3]
    assert batch["eps"].shape[1:3] == batch["teacher_v"].shape[2:4] == resolution
    assert batch["x"].shape[0] == 4 and batch["teacher_v"].shape[1] == 1
    assert batch["teacher_v"].dtype == batch["eps"].dtype == jnp.bfloat16
    seen.add(resolution)
  assert seen == {(8, 8), (16, 16)}


def test_bucket_config_mismatch_is_a_clear_error(bucketed_cache, teacher_cache):
  cache, config = bucketed_cache
  with pytest.raises(cache_lib.CacheError, match=r"config\.cache\.buckets=\(8x8\).*\(8x8, 16x16\)"):
    cache_lib.open_training_caches(cache, ["a"], buckets=(8,), base_seed=0, noise_draws=2,
                                   schedule_config=config.diffusion.schedule.to_dict(), dtype="bfloat16")
  config, workdir = teacher_cache
  config = config.copy_and_resolve_references()
  config.cache.buckets = (8, "16x16")
  with pytest.raises(cache_lib.CacheError, match=r"config\.cache\.buckets"):
    multi_teacher.open_caches(config, workdir, ("a", "b"))
  with pytest.raises(cache_lib.CacheError, match=r"config\.cache\.buckets"):
    multi_teacher.build_teacher_cache(config, workdir, "a")


# ----------------------------------------------------------------------------- sharded build

SHARDED_BUILD = textwrap.dedent("""
    import sys, jax
    sys.path.insert(0, "{tests}")
    assert jax.device_count() == 8
    from conftest import tiny_multi_teacher_config, tiny_teacher_params
    from jdistill.methods import multi_teacher
    config = tiny_multi_teacher_config("{teachers}")
    config.cache.build_batch_size = 100          # padded to 104 = 13 per device
    multi_teacher.build_teacher_cache(config, "{workdir}", "a")
    print("built")
""")


def test_an_eight_device_build_equals_a_one_device_build(teacher_cache, tmp_path):
  config, workdir = copy_workdir(teacher_cache, tmp_path, teachers=())
  env = dict(ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  script = SHARDED_BUILD.format(tests=os.path.join(REPO, "tests"), teachers=teacher_cache[1],
                                workdir=workdir)
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "built" in result.stdout, result.stderr[-3000:]
  one = cache_lib.teacher_dir(os.path.join(teacher_cache[1], "cache"), "a")
  eight = cache_lib.teacher_dir(os.path.join(workdir, "cache"), "a")
  for shard in ("8x8/00000-of-00006.array_record", "8x8/00005-of-00006.array_record"):
    for r1, r8 in zip(records(os.path.join(one, shard)), records(os.path.join(eight, shard))):
      assert (r1["sample_id"], r1["seed"], r1["t"]) == (r8["sample_id"], r8["seed"], r8["t"])
      np.testing.assert_array_equal(r1["eps"], r8["eps"])
      np.testing.assert_allclose(r1["prediction"], r8["prediction"], rtol=0, atol=1e-4)
  assert cache_lib.verify(os.path.join(workdir, "cache"), ["a"]) == []
