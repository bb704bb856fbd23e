"""Multi-teacher distillation: weights validated and normalised, the target against a hand
computation, training on the caches lowers every per-teacher loss (and ends with FD and
result.json), a corrupt or missing cache record stops training naming the file."""
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from jdistill.errors import ConfigError
from jdistill.methods import multi_teacher as mt_method, validate
from jdistill.data import cache as cache_lib
from jdistill.data import pipeline
from jdistill.diffusion.losses import weighted_x_loss
from jdistill.diffusion.schedules import make_schedule
from jdistill.methods import multi_teacher
from jdistill.objectives import multi_teacher as mt_objective
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import setup
from jdistill.train import teachers as teacher_lib
from jdistill import methods

from conftest import tiny_teacher_params
from test_cache import SHARD, copy_workdir, records
from test_progressive import _scalars


def test_weights_are_validated_and_normalised():
  config = mt_method.get_config("digits")
  validate(config, 1)
  config.multi_teacher.teachers.s1.weight = -1.0
  with pytest.raises(ConfigError, match=r"config\.multi_teacher\.teachers\.s1\.weight: must be a number >= 0"):
    validate(config, 1)
  with pytest.raises(ConfigError, match=r"config\.multi_teacher\.teachers\.s1\.weight"):
    mt_objective.teacher_weights(config.multi_teacher.teachers)
  for teacher_id in config.multi_teacher.teachers:
    config.multi_teacher.teachers[teacher_id].weight = 0.0
  with pytest.raises(ConfigError, match=r"config\.multi_teacher\.teachers: all weights are 0"):
    validate(config, 1)
  with pytest.raises(ConfigError, match=r"config\.multi_teacher\.teachers: all weights are 0"):
    mt_objective.teacher_weights(config.multi_teacher.teachers)
  ids, weights = mt_objective.teacher_weights({"b": {"weight": 1}, "a": {"weight": 3}, "c": {"weight": 0}})
  assert ids == ("a", "b", "c")
  np.testing.assert_allclose(weights, [0.75, 0.25, 0.0])


def test_config_presets_validate():
  import configs.multi_teacher as multi_teacher_configs
  validate(multi_teacher_configs.get_config(), 1)
  finetune = multi_teacher_configs.get_config("finetune")
  validate(finetune, 1)
  assert finetune.method == "teacher" and finetune.teacher.checkpoint.endswith("digits_teacher.msgpack")


def test_huber_equals_mse_for_small_errors_and_grows_linearly():
  x_hat, logsnr = jnp.zeros((2, 4)), jnp.array([0.0, 2.0])        # v_mse weight 1 + e^logsnr
  small, large = jnp.full((2, 4), 0.01), jnp.full((2, 4), 3.0)
  mse = weighted_x_loss(x_hat, small, logsnr, "v_mse")
  np.testing.assert_allclose(weighted_x_loss(x_hat, small, logsnr, "v_mse", huber_delta=0.1), mse, rtol=1e-6)
  error = np.sqrt(1 + np.exp(np.array([0.0, 2.0]))) * 3.0        # sqrt(w) |x_hat - x|
  np.testing.assert_allclose(weighted_x_loss(x_hat, large, logsnr, "v_mse", huber_delta=0.1),
                             2 * 0.1 * error - 0.1**2, rtol=1e-6)


def test_student_init_heaviest_teacher_average_or_random(teacher_cache):
  config, workdir = teacher_cache
  config = config.copy_and_resolve_references()
  exp = setup.build(config, workdir, evaluator=False, record_config=False)
  ids, weights = mt_objective.teacher_weights(config.multi_teacher.teachers)   # a: 0.75, b: 0.25
  load = lambda i: teacher_lib.load_checkpoint(config.multi_teacher.teachers[i].checkpoint,
                                               exp.abstract_params(), config)
  a, b = load("a"), load("b")
  init = lambda: multi_teacher.student_params(config, ids, weights, exp.abstract_params())
  config.multi_teacher.student_init = ""                              # '': the heaviest, a
  for x, y in zip(jax.tree.leaves(init()), jax.tree.leaves(a)):
    np.testing.assert_array_equal(x, y)
  config.multi_teacher.student_init = "average"                       # 0.75 a + 0.25 b, leaf by leaf
  for x, y, z in zip(jax.tree.leaves(init()), jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, 0.75 * y + 0.25 * z, rtol=1e-6, atol=1e-7)
  config.multi_teacher.student_init = "random"
  assert init() is None


def test_target_is_the_hand_computed_weighted_average(teacher_cache):
  config, workdir = teacher_cache
  ids, weights = mt_objective.teacher_weights(config.multi_teacher.teachers)
  np.testing.assert_allclose(weights, [0.75, 0.25])
  caches = multi_teacher.open_caches(config, workdir, ids)
  batch = next(pipeline.make_iterator(cache_lib.training_dataset(caches, 8, seed=0)))
  vp_denoiser = types.SimpleNamespace(path="vp")            # targets read only its path
  objective = mt_objective.MultiTeacherObjective(
      vp_denoiser, make_schedule(config.diffusion.schedule), None, None, 1, (8, 8, 1), ids)
  _, _, _, x_target = objective.targets(jax.tree.map(jnp.asarray, batch), jnp.asarray(weights))

  # by hand, in float64: cosine logSNR, z_t = alpha x + sigma eps, x_k = alpha z_t - sigma v_k
  t = batch["t"].astype(np.float64)[:, None, None, None]
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  logsnr = -2 * np.log(np.tan(a * t + b))
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
  z = alpha * batch["x"] + sigma * batch["eps"]
  x_a = alpha * z - sigma * batch["teacher_v"][:, 0]
  x_b = alpha * z - sigma * batch["teacher_v"][:, 1]
  np.testing.assert_allclose(x_target, 0.75 * x_a + 0.25 * x_b, atol=2e-5)
  assert np.max(np.abs(x_a - x_b)) > 1e-2          # the two teachers really disagree


def _student_config(teacher_cache, cache_dir, **train):
  config, _ = teacher_cache
  config = config.copy_and_resolve_references()
  config.cache.dir = cache_dir
  config.train.update(**train)
  return config


def test_training_on_the_caches_lowers_every_per_teacher_loss(teacher_cache, tmp_path):
  config = _student_config(teacher_cache, os.path.join(teacher_cache[1], "cache"), num_steps=60,
                           log_every=20, save_every=60)
  student = str(tmp_path / "student.msgpack")          # a random net unrelated to both teachers
  with open(student, "wb") as f:
    f.write(serialization.to_bytes(tiny_teacher_params(config, 9, base=9)))
  config.multi_teacher.update(student_init=student, evaluate_teachers=True)
  config.optim.update(lr=2e-3, warmup_steps=5)
  workdir = str(tmp_path / "student")
  methods.train(config, workdir)
  for tag in ("loss", "loss_a", "loss_b"):     # means over steps 1-20, 21-40, 41-60
    losses = _scalars(workdir, tag)
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.8 * losses[0], (
        tag, losses)
  assert len(_scalars(workdir, "grad_norm")) == len(_scalars(workdir, "lr")) == 3
  with open(os.path.join(workdir, "result.json")) as f:
    result = json.load(f)
  assert result["student"][0]["steps"] == 2 and np.isfinite(result["student"][0]["fd"])
  assert result["teachers"]["a"]["weight"] == 0.75 and np.isfinite(result["teachers"]["b"]["fd"]["2"])
  assert result["cached_examples"] == 2 * 1297
  summary = open(os.path.join(workdir, "summary.md")).read()
  mean = np.mean([result["teachers"][t]["fd"]["2"] for t in ("a", "b")])
  assert f"| mean of the teachers | | {mean:.4g} |" in summary and "| **student** | | **" in summary
  # the student's every metric, FD (teacher) to the heaviest teacher 'a', and the floors
  student = result["student"][0]
  assert result["fidelity_teacher"] == "a" and np.isfinite(student["fd_teacher"])
  assert f"| 2 | {student['fd']:.4g} | {student['fd_teacher']:.4g} | {student['memorised']:.3f} |" in summary
  assert "The student against teacher a" in summary and "Floors: FD (data)" in summary


def test_a_corrupt_record_stops_training_naming_the_file(teacher_cache, tmp_path):
  _, copy = copy_workdir(teacher_cache, tmp_path)
  cache = os.path.join(copy, "cache")
  corrupt = os.path.join(cache_lib.teacher_dir(cache, "b"), "8x8/00000-of-00006.array_record")
  rows = records(corrupt)
  for row in rows:
    row["prediction"] = row["prediction"].copy()
    row["prediction"][2, 3, 0] = np.nan
  cache_lib.write_shard(corrupt, [cache_lib.encode_record(r) for r in rows])
  config = _student_config(teacher_cache, cache, num_steps=8, save_every=4)
  workdir = str(tmp_path / "student")
  with pytest.raises(cache_lib.CacheError, match=f"{corrupt}: record [0-9]+ .*NaN"):
    methods.train(config, workdir)
  assert ckpt_lib.manager(os.path.join(workdir, "checkpoints"), asynchronous=False).latest_step() is None

  missing = os.path.join(cache_lib.teacher_dir(cache, "a"), SHARD)      # caught before training
  os.remove(missing)
  with pytest.raises(cache_lib.CacheError, match=f"{missing}: missing shard"):
    methods.train(config, str(tmp_path / "student2"))


def test_a_repointed_or_replaced_teacher_is_refused_before_training(teacher_cache, tmp_path):
  config = _student_config(teacher_cache, os.path.join(teacher_cache[1], "cache"))
  moved = str(tmp_path / "b_moved.msgpack")             # the same bytes elsewhere: the same teacher
  shutil.copy(config.multi_teacher.teachers.b.checkpoint, moved)
  built_from = config.multi_teacher.teachers.b.checkpoint
  config.multi_teacher.teachers.b.checkpoint = moved
  multi_teacher.open_caches(config, teacher_cache[1], ("a", "b"))
  with open(moved, "wb") as f:                           # replaced by another teacher
    f.write(serialization.to_bytes(tiny_teacher_params(config, 7)))
  directory = cache_lib.teacher_dir(os.path.join(teacher_cache[1], "cache"), "b")
  message = (rf"config\.multi_teacher\.teachers\.b\.checkpoint='{moved}' \(sha256 [0-9a-f]{{16}}\) but "
             rf"{directory} holds the predictions of '{built_from}' \(sha256 [0-9a-f]{{16}}\): rebuild it "
             r"with `python -m jdistill.cache build-teacher --teacher=b --config.cache.skip_existing=False`")
  with pytest.raises(cache_lib.CacheError, match=message):
    multi_teacher.open_caches(config, teacher_cache[1], ("a", "b"))
  workdir = str(tmp_path / "student")
  with pytest.raises(cache_lib.CacheError, match=message):
    methods.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))

  _, copy = copy_workdir(teacher_cache, tmp_path, teachers=("a", "b"))   # a cache that records no
  manifest_path = os.path.join(cache_lib.teacher_dir(os.path.join(copy, "cache"), "b"), "manifest.json")
  with open(manifest_path) as f:                         # digest: the path decides
    manifest = json.load(f)
  del manifest["checkpoint_sha256"]
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  config.cache.dir = os.path.join(copy, "cache")
  with pytest.raises(cache_lib.CacheError, match=rf"checkpoint='{moved}' but .* '{built_from}':"):
    multi_teacher.open_caches(config, copy, ("a", "b"))
  config.multi_teacher.teachers.b.checkpoint = built_from
  multi_teacher.open_caches(config, copy, ("a", "b"))
