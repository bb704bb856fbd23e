"""Memorisation rate, precision / recall, FD to the teacher, and the held-out split kept out of
training (CPU, small)."""
import hashlib
from unittest import mock

import jax
import numpy as np
import pytest

from jdistill import methods
from jdistill.config import base_config
from jdistill.data import pipeline, sources
from jdistill.eval import evaluate as eval_lib
from jdistill.eval import frechet, neighbours
from jdistill.methods import common
from jdistill.train import setup, teachers

CENTERS = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4])


def evaluator(test, train, features="raw", neighbour_examples=0, num_samples=64):
  data_shape = test.data_shape
  return eval_lib.FDEvaluator(eval_lib.Sampler(None, None, data_shape), test, features, num_samples,
                              training_source=train, neighbour_examples=neighbour_examples)


def modes_of(points):
  return np.argmin(((points[:, None] - CENTERS[None]) ** 2).sum(-1), 1)


# ----------------------------------------------------------------------------- memorisation

def test_copies_of_training_digits_are_memorised_and_held_out_ones_read_the_floor():
  train, test = sources.digits("train"), sources.digits("test")
  fd = evaluator(test, train, features="digits")
  floor = fd.floors(count=500)                       # as many as the held-out split: one compile
  assert 0.03 <= floor["memorised"] <= 0.07          # computed: the 5th percentile's own share
  assert floor["data_count"] == 500
  assert fd.fd_of(train.records.x[-500:])["memorised"] >= 0.95


def test_fresh_draws_read_about_the_floor():
  """toy2d: held-out points outside the subset that sets the threshold are fresh draws of the
  distribution; their memorised share is the floor's within 0.025 (binomial sd ~0.007 here)."""
  train, test = sources.toy2d("8gaussians", "train"), sources.toy2d("8gaussians", "test")
  fd = evaluator(test, train, neighbour_examples=3000)
  used = set(eval_lib._subset(len(test.records), 3000))
  fresh = test.records.x[[i for i in range(6000) if i not in used][:2000]]
  floor = fd.floors()["memorised"]
  assert 0.04 <= floor <= 0.06
  assert abs(fd.fd_of(fresh)["memorised"] - floor) <= 0.025
  copies = fd.neighbour_reference["train"][:500]              # training points it compares with
  assert fd.fd_of(copies)["memorised"] == 1.0


# ----------------------------------------------------------------------------- precision / recall

@pytest.mark.parametrize("kept", [4, 6])
def test_dropped_modes_lower_recall_to_the_covered_share(kept):
  real = sources.toy2d("8gaussians", "test").records.x[:4000]
  train = sources.toy2d("8gaussians", "train").records.x[:8000]
  fake = train[modes_of(train) < kept][:4000]
  result = neighbours.precision_recall(real, fake)
  assert result["recall"] == pytest.approx(kept / 8, abs=0.05)
  assert result["precision"] >= 0.95
  full = neighbours.precision_recall(real, train[:4000])
  assert full["recall"] >= 0.95 and full["precision"] >= 0.95


def brute_force_precision_recall(real, fake, k):
  def distances(a, b):
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  real_radii = np.sort(distances(real, real), 1)[:, k]
  fake_radii = np.sort(distances(fake, fake), 1)[:, k]
  precision = np.mean((distances(fake, real) <= real_radii[None]).any(1))
  recall = np.mean((distances(real, fake) <= fake_radii[None]).any(1))
  return precision, recall


def test_precision_recall_match_brute_force_in_small_blocks(monkeypatch):
  """Blocks of 4 queries x chunks of 8 points (padding on both sides) give numpy's answer."""
  monkeypatch.setattr(neighbours, "QUERY_BLOCK", 4)
  monkeypatch.setattr(neighbours, "POINT_CHUNK", 8)
  rng = np.random.RandomState(0)
  real = rng.randn(21, 3)
  fake = 0.5 * rng.randn(13, 3) + 1.0
  precision, recall = brute_force_precision_recall(real, fake, 3)
  assert 0 < precision < 1 and 0 < recall < 1
  result = neighbours.precision_recall(real, fake)
  assert result["precision"] == pytest.approx(precision) and result["recall"] == pytest.approx(recall)
  d = np.sort(((fake[:, None] - real[None]) ** 2).sum(-1), 1)[:, :3]
  np.testing.assert_allclose(neighbours.nearest_squared_distances(fake, real, 3), d, rtol=1e-5)


def test_precision_recall_need_more_samples_than_k():
  train, test = sources.toy2d("8gaussians", "train"), sources.toy2d("8gaussians", "test")
  fd = evaluator(test, train, neighbour_examples=500)
  assert set(fd.fd_of(train.records.x[:4])) == {"fd", "swd", "memorised", "precision", "recall"}
  assert set(fd.fd_of(train.records.x[:3])) == {"fd", "swd", "memorised"}


# ----------------------------------------------------------------------------- FD to the teacher

def test_fd_to_the_teacher_floor_is_small_and_a_broken_model_is_far(tmp_path):
  """The bundled checkerboard teacher against itself (other seeds) vs a model with its weights
  scrambled; the teacher is sampled once per draw, whatever is evaluated."""
  config = base_config("toy2d")
  config.eval.update(num_samples=400, batch_size=400, neighbour_examples=500)
  exp = setup.build(config, str(tmp_path), record_config=False)
  teacher = teachers.load_teacher(exp)
  broken = jax.tree.map(lambda p: p[::-1] if p.ndim else p, teacher)
  fd = exp.evaluator
  fd.set_teacher(teacher, 8)
  with mock.patch.object(fd.sampler, "sample", wraps=fd.sampler.sample) as sample:
    floor = fd.floors()["fd_teacher"]
    broken_result, _ = fd.evaluate(broken, 8)
    teacher_result, _ = fd.evaluate(teacher, 8)
    assert fd.floors()["fd_teacher"] == floor
  assert sample.call_count == 4           # two teacher draws, then the two evaluated models
  near = max(floor, teacher_result["fd_teacher"])
  assert near < 0.05 and broken_result["fd_teacher"] > 10 * near, (floor, teacher_result,
                                                                    broken_result)
  assert floor == pytest.approx(frechet.frechet_distance(
      fd.sampler.sample(teacher, 8, 400, fd.seed + 1), fd.sampler.sample(teacher, 8, 400, fd.seed + 2)))
  lines = common.floor_lines(exp)
  assert f"the teacher against itself: {floor:.4g}" in lines[-1]
  # the loop's TensorBoard scalars carry every metric
  scalars, _ = common.fd_callback(exp, [8])(teacher, 0)
  assert {"fd_8steps", "fd_teacher_8steps", "memorised_8steps", "precision_8steps",
          "recall_8steps"} <= set(scalars)
  assert common.reused_evaluation(exp, scalars, 8)["fd_teacher"] == scalars["fd_teacher_8steps"]
  assert common.reused_evaluation(exp, {"fd_8steps": 1.0}, 8) is None     # no FD (teacher) in it


def test_metric_cells_leave_absent_metrics_blank():
  assert common.metric_cells({"fd": 1.23456, "precision": 0.5, "recall": 0.25}) == [
      "1.235", "", "", "0.500", "0.250"]


# ----------------------------------------------------------------------------- held-out split

def row_hashes(x):
  x = np.asarray(x)
  return {hashlib.sha256(np.ascontiguousarray(row).tobytes()).hexdigest() for row in x}


def write_image(path, red):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (8, 8), (red, 0, 0)).save(path)


def split_configs(tmp_path):
  """{name: config.data} for every data source and preset: digits, toy2d (each distribution),
  TFDS presets, an image folder."""
  configs = {"digits": base_config("digits").data}
  for name in sources.TOY2D:
    data = base_config("toy2d").data
    data.name = name
    configs[f"toy2d:{name}"] = data
  for preset in ("mnist", "cifar10", "imagenet64"):
    configs[preset] = base_config(preset).data
  for red in range(5):
    write_image(tmp_path / "train" / "a" / f"{red}.png", red)
  for red in range(10, 13):
    write_image(tmp_path / "test" / "a" / f"{red}.png", red)
  configs["image_folder"] = base_config("digits").data
  configs["image_folder"].update(source="image_folder", path=str(tmp_path), resolution=8)
  return configs


def fake_tfds_split(name, split, data_dir):
  """Distinct records per split name (TFDS mock_data gives every split the same ones)."""
  seed = int(hashlib.sha256(f"{name}|{split}".encode()).hexdigest()[:8], 16)
  images = np.random.RandomState(seed).randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  return [{"image": image, "label": 0} for image in images]


def test_train_and_held_out_splits_share_no_example(tmp_path):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6), \
      mock.patch.object(sources, "open_tfds_split", side_effect=fake_tfds_split) as opened:
    for name, data in split_configs(tmp_path).items():
      train, test = (pipeline.all_examples(sources.load_split(data, s))["x"] for s in ("train", "test"))
      assert len(train) and len(test)
      assert not row_hashes(train) & row_hashes(test), name
    assert {call.args[1] for call in opened.call_args_list} == {"train", "test", "validation"}


class Stop(Exception):
  """Ends a method's driver where it hands the loop its training data."""


@pytest.mark.parametrize("preset", ["toy2d", "digits"])
@pytest.mark.parametrize("method", ["teacher", "progressive", "dmd2", "tdm"])
def test_each_method_trains_on_the_train_split_only(method, preset, tmp_path):
  """What each driver feeds the loop is the train split's pipeline (the held-out split only
  evaluates); the compile and evaluations are stubbed out."""
  from jdistill.methods import distribution_matching, progressive, teacher
  config = {"teacher": teacher.get_config, "progressive": progressive.get_config,
            "dmd2": lambda p: distribution_matching.get_config(p, "dmd2"),
            "tdm": lambda p: distribution_matching.get_config(p, "tdm")}[method](preset)
  fed = []

  def train_dataset(source, *args, **kwargs):
    fed.append(source)
    raise Stop
  with mock.patch.object(pipeline, "train_dataset", side_effect=train_dataset), \
      mock.patch("jdistill.train.loop.compile_step", return_value=mock.Mock(state_shardings=None)), \
      mock.patch.object(eval_lib.FDEvaluator, "evaluate", return_value=({"fd": 1.0}, None)), \
      mock.patch.object(eval_lib.FDEvaluator, "speed", return_value=1.0):
    if "dmd" in config:
      config.dmd.regression_weight = 0.0
    with pytest.raises(Stop):
      methods.train(config, str(tmp_path))
  train = sources.load_split(config.data, "train").records.x
  assert len(fed) == 1 and np.array_equal(fed[0].records.x, train)


def test_multi_teacher_caches_are_built_from_the_train_split(tmp_path):
  from jdistill.data import cache as cache_lib
  from jdistill.methods import multi_teacher
  config = multi_teacher.get_config("digits")
  with mock.patch.object(cache_lib, "build_latents", return_value=None) as build:
    multi_teacher.build_latents_cache(config, str(tmp_path))
  assert np.array_equal(build.call_args.args[0].records.x, sources.digits("train").records.x)
