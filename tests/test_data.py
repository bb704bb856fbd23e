"""Data sources (digits, toy2d, TFDS under mock_data, image folders) and the grain pipeline (CPU, fast)."""
import contextlib
import json
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from jdistill.config import base_config
from jdistill.data import pipeline, sources
from jdistill.errors import ConfigError


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def indexed(source):
  """The same examples with label = index, so pipeline outputs can be traced to their source row."""
  n = len(source.records)
  return sources.Source(sources.ArraySource(source.records.x, np.arange(n, dtype=np.int32)),
                        source.data_shape, n)


# ----------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits_train():
  return sources.digits("train")


@pytest.fixture(scope="module")
def digits_test():
  return sources.digits("test")


def test_digits_sizes_shapes_values(digits_train, digits_test):
  for source, size in ((digits_train, 1297), (digits_test, 500)):
    assert len(source.records) == size
    assert tuple(source.data_shape) == (8, 8, 1)
    assert source.is_image
    assert source.num_classes == 10
    x, label = source.records.x, source.records.label
    assert x.shape == (size, 8, 8, 1) and x.dtype == np.float32
    assert label.shape == (size,) and label.dtype == np.int32
    assert x.min() == -1.0 and x.max() == 1.0
    assert set(label.tolist()) == set(range(10))
    record = source.records[5]
    assert record["x"].shape == (8, 8, 1)
    np.testing.assert_array_equal(record["x"], x[5])
    assert record["label"] == label[5]


def test_digits_values_are_scaled_pixels(digits_train):
  # sklearn digits pixels are integers 0..16 mapped linearly to [-1, 1]
  pixels = (digits_train.records.x + 1.0) / 2.0 * 16.0
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-5)


def test_digits_split_is_fixed(digits_train, digits_test):
  again_train, again_test = sources.digits("train"), sources.digits("test")
  np.testing.assert_array_equal(again_train.records.x, digits_train.records.x)
  np.testing.assert_array_equal(again_train.records.label, digits_train.records.label)
  np.testing.assert_array_equal(again_test.records.x, digits_test.records.x)
  np.testing.assert_array_equal(again_test.records.label, digits_test.records.label)


def test_digits_train_and_test_partition_the_dataset(digits_train, digits_test):
  """train + test is exactly the 1797 scikit-learn digits as a multiset of (image, label) rows:
  every original row is used once (duplicate images in digits are handled by counting)."""
  from collections import Counter
  from sklearn.datasets import load_digits
  data = load_digits()
  full = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]

  def rows(x, label):
    return Counter(xi.tobytes() + np.int32(li).tobytes() for xi, li in zip(x, label))

  full_rows = rows(full, data.target)
  train_rows = rows(digits_train.records.x, digits_train.records.label)
  test_rows = rows(digits_test.records.x, digits_test.records.label)
  assert train_rows + test_rows == full_rows
  assert sum(train_rows.values()) + sum(test_rows.values()) == 1797
  # Images that occur once in the full set cannot be in both splits.
  unique = {k for k, v in full_rows.items() if v == 1}
  assert not (set(train_rows) & set(test_rows) & unique)


def test_digits_unknown_split():
  with pytest.raises(ValueError, match="split"):
    sources.digits("validation")


# ----------------------------------------------------------------------------- toy2d

@pytest.mark.parametrize("name", sources.TOY2D)
def test_toy2d(name):
  train = sources.toy2d(name, "train", num_examples=5000)
  test = sources.toy2d(name, "test", num_examples=5000)
  for source in (train, test):
    x = source.records.x
    assert x.shape == (5000, 2) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    assert np.abs(x).max() <= 1.5
    assert x.std(axis=0).min() > 0.1        # spread out, not collapsed
    assert tuple(source.data_shape) == (2,) and not source.is_image
    assert source.num_classes == 0
    assert np.all(source.records.label == 0)
  assert not np.allclose(train.records.x, test.records.x)
  np.testing.assert_array_equal(sources.toy2d(name, "train", num_examples=5000).records.x,
                                train.records.x)


def test_toy2d_via_load_split_and_unknown_name():
  config = base_config("toy2d").data
  source = sources.load_split(config, "train")
  assert source.records.x.shape == (50_000, 2)
  config.name = "spirals"
  with pytest.raises(ValueError, match=r"config\.data\.name"):
    sources.load_split(config, "train")


def test_unknown_source():
  config = base_config("digits").data
  config.source = "s3"
  with pytest.raises(ValueError, match=r"config\.data\.source"):
    sources.load_split(config, "train")


# ----------------------------------------------------------------------------- grain pipeline

def test_pipeline_batches_shapes(digits_train):
  batches = take(pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, seed=0)), 3)
  for b in batches:
    assert b["x"].shape == (32, 8, 8, 1) and b["x"].dtype == np.float32
    assert b["label"].shape == (32,) and b["label"].dtype == np.int32


def test_pipeline_drop_remainder_and_epochs():
  """10 examples, batches of 4: every batch is full, and each epoch visits every example once
  (reshuffled per epoch)."""
  x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
  source = sources.Source(sources.ArraySource(x, np.arange(10, dtype=np.int32)), (2, 2, 1), 10)
  batches = take(pipeline.make_iterator(pipeline.train_dataset(source, 4, seed=3)), 10)
  assert all(b["label"].shape == (4,) and b["x"].shape == (4, 2, 2, 1) for b in batches)
  labels = np.concatenate([b["label"] for b in batches])
  epoch1, epoch2 = labels[:10], labels[10:20]
  assert sorted(epoch1.tolist()) == list(range(10))
  assert sorted(epoch2.tolist()) == list(range(10))
  assert epoch1.tolist() != epoch2.tolist()
  for b in batches:       # x and label stay aligned
    np.testing.assert_array_equal(b["x"][:, 0, 0, 0], b["label"].astype(np.float32))


def test_pipeline_same_seed_same_batches(digits_train):
  a = take(pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, seed=7)), 5)
  b = take(pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, seed=7)), 5)
  assert_batches_equal(a, b)
  c = take(pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, seed=8)), 5)
  assert not np.array_equal(np.concatenate([x["x"] for x in a]),
                            np.concatenate([x["x"] for x in c]))


@pytest.mark.parametrize("flip", [False, True])
def test_pipeline_restore_from_state(digits_train, flip):
  k, n = 3, 4
  unbroken = take(pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, 11, flip)), k + n)
  first = pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, 11, flip))
  assert_batches_equal(take(first, k), unbroken[:k])
  state = json.loads(json.dumps(first.get_state()))      # JSON-able, as checkpoints store it
  restored = pipeline.make_iterator(pipeline.train_dataset(digits_train, 32, 11, flip), state)
  assert_batches_equal(take(restored, n), unbroken[k:])
  assert_batches_equal(take(first, n), unbroken[k:])     # taking the state does not disturb it


def test_pipeline_flip_images(digits_train):
  source = indexed(digits_train)
  x = source.records.x
  flipped_batches = take(pipeline.make_iterator(pipeline.train_dataset(source, 64, 5, flip=True)), 4)
  plain_batches = take(pipeline.make_iterator(pipeline.train_dataset(source, 64, 5, flip=False)), 4)
  n_flipped = n_same = 0
  for fb, pb in zip(flipped_batches, plain_batches):
    np.testing.assert_array_equal(fb["label"], pb["label"])   # flipping does not change the order
    np.testing.assert_array_equal(pb["x"], x[pb["label"]])     # no flip: the source images
    for image, index in zip(fb["x"], fb["label"]):
      original, mirrored = x[index], x[index][:, ::-1]
      if np.array_equal(original, mirrored):
        continue                                                # symmetric: cannot tell
      if np.array_equal(image, mirrored):
        n_flipped += 1
      else:
        np.testing.assert_array_equal(image, original)
        n_same += 1
  total = n_flipped + n_same
  assert total > 200
  assert 0.3 < n_flipped / total < 0.7                          # p = 0.5
  again = take(pipeline.make_iterator(pipeline.train_dataset(source, 64, 5, flip=True)), 4)
  assert_batches_equal(again, flipped_batches)                  # the flips are seeded too


def test_pipeline_flip_is_noop_for_toy2d():
  source = sources.toy2d("moons", "train", num_examples=1000)
  with_flip = take(pipeline.make_iterator(pipeline.train_dataset(source, 50, 2, flip=True)), 3)
  without = take(pipeline.make_iterator(pipeline.train_dataset(source, 50, 2, flip=False)), 3)
  assert_batches_equal(with_flip, without)
  assert with_flip[0]["x"].shape == (50, 2)


def test_all_examples(digits_test):
  all_ = pipeline.all_examples(digits_test)
  np.testing.assert_array_equal(all_["x"], digits_test.records.x)
  np.testing.assert_array_equal(all_["label"], digits_test.records.label)
  first = pipeline.all_examples(digits_test, limit=7)
  assert first["x"].shape == (7, 8, 8, 1)
  np.testing.assert_array_equal(first["x"], digits_test.records.x[:7])


# ----------------------------------------------------------------------------- TFDS (mocked)

def refuse_downloads():
  """Any TFDS download attempt fails the test (mock_data alone makes one a silent no-op)."""
  import tensorflow_datasets as tfds
  return mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare",
                           side_effect=AssertionError("TFDS tried to download"))


@contextlib.contextmanager
def offline_mock_data(num_examples):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=num_examples), refuse_downloads():
    yield


@pytest.mark.parametrize("preset,shape", [("cifar10", (32, 32, 3)), ("mnist", (32, 32, 1))])
def test_tfds_mocked(preset, shape):
  config = base_config(preset).data
  assert config.source == "tfds"
  with offline_mock_data(num_examples=20):
    for split in ("train", "test"):
      source = sources.load_split(config, split)
      assert len(source.records) == 20
      assert tuple(source.data_shape) == shape
      assert source.num_classes == 10
      assert source.is_image
      for i in (0, 7, 19):
        record = source.records[i]
        assert record["x"].shape == shape and record["x"].dtype == np.float32
        assert -1.0 <= record["x"].min() and record["x"].max() <= 1.0
        assert record["x"].std() > 0
        assert record["label"].dtype == np.int32 and 0 <= int(record["label"]) < 10
    iterator = pipeline.make_iterator(pipeline.train_dataset(source, 8, seed=0, flip=config.flip))
    batch = next(iterator)
    assert batch["x"].shape == (8, *shape) and batch["label"].shape == (8,)
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0


def test_tfds_mocked_native_resolution_and_varying_sizes():
  config = base_config("mnist").data
  config.resolution = 0                       # keep MNIST's own 28x28
  with offline_mock_data(num_examples=4):
    source = sources.load_split(config, "train")
    assert tuple(source.data_shape) == (28, 28, 1)
    assert source.records[0]["x"].shape == (28, 28, 1)

    config.update(name="tf_flowers", train_split="train", resolution=16)   # images of varying size
    source = sources.load_split(config, "train")
    assert tuple(source.data_shape) == (16, 16, 3)
    assert {source.records[i]["x"].shape for i in range(4)} == {(16, 16, 3)}
    config.resolution = 0
    with pytest.raises(ValueError, match=r"config\.data\.resolution"):
      sources.load_split(config, "train")


def test_tfds_missing_dataset_names_data_dir_and_how_to_build_it(tmp_path):
  """An unprepared dataset is never downloaded: a ConfigError says where it was looked for and the
  command that prepares it, and nothing is written into data_dir."""
  config = base_config("mnist").data
  config.data_dir = str(tmp_path)
  with refuse_downloads(), pytest.raises(ConfigError) as info:
    sources.load_split(config, "test")
  message = str(info.value)
  assert message.startswith("config.data.data_dir: TFDS dataset config.data.name='mnist' is not "
                            f"prepared in config.data.data_dir={str(tmp_path)!r} (searched {tmp_path}/mnist/")
  assert message.endswith(f"`tfds build mnist --data_dir={tmp_path} --file_format=array_record`")
  assert list(tmp_path.iterdir()) == []


def test_tfds_unknown_dataset():
  config = base_config("cifar10").data
  config.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match=r"config\.data\.name"):
    sources.load_split(config, "train")


# ----------------------------------------------------------------------------- image folders

def write_image(path, size, color, mode="RGB"):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path)


def image_folder_config(path, resolution=8):
  config = base_config("digits").data
  config.update(source="image_folder", path=str(path), resolution=resolution)
  return config


def red_values(source):
  """Each image's red channel back in 0..255: the test images are single colours told apart by it."""
  return np.round((source.records.x[:, 0, 0, 0] + 1.0) * 127.5).astype(int).tolist()


def test_image_folder(tmp_path):
  train = tmp_path / "train"
  write_image(train / "classA" / "a0.png", (8, 8), (255, 0, 51))          # already 8x8: exact
  write_image(train / "classA" / "a1.png", (20, 12), (0, 255, 0))
  (train / "classA" / "notes.txt").write_text("ignored")
  write_image(train / "classB" / "b0.png", (16, 16), 200, mode="L")       # grayscale -> RGB
  write_image(train / "classB" / "b1.PNG", (5, 9), (10, 20, 30, 255), mode="RGBA")
  write_image(tmp_path / "test" / "classA" / "t0.png", (8, 8), (1, 1, 1))
  source = sources.load_split(image_folder_config(tmp_path), "train")
  assert len(source.records) == 4
  assert tuple(source.data_shape) == (8, 8, 3)
  assert source.num_classes == 2
  x, labels = source.records.x, source.records.label
  assert x.shape == (4, 8, 8, 3) and x.dtype == np.float32
  assert labels.tolist() == [0, 0, 1, 1]                  # sorted class folders: classA=0, classB=1
  assert -1.0 <= x.min() and x.max() <= 1.0
  np.testing.assert_allclose(x[0], np.broadcast_to([1.0, -1.0, 51 / 127.5 - 1.0], (8, 8, 3)),
                             atol=1e-6)
  np.testing.assert_allclose(x[1], np.broadcast_to([-1.0, 1.0, -1.0], (8, 8, 3)), atol=1e-6)
  np.testing.assert_allclose(x[2], np.full((8, 8, 3), 200 / 127.5 - 1.0), atol=1e-6)
  np.testing.assert_allclose(x[3], np.broadcast_to(np.array([10, 20, 30]) / 127.5 - 1.0, (8, 8, 3)),
                             atol=1e-6)
  batch = next(pipeline.make_iterator(pipeline.train_dataset(source, 2, seed=0, flip=True)))
  assert batch["x"].shape == (2, 8, 8, 3)


def test_image_folder_test_split_is_its_own_folder(tmp_path):
  """train/ and test/ (config.data.train_split, test_split) are read apart: the test split holds
  exactly its own images, none of the training ones, labelled with the training split's classes."""
  for red in (10, 11, 12):
    write_image(tmp_path / "train" / "cat" / f"{red}.png", (8, 8), (red, 0, 0))
  for red in (20, 21):
    write_image(tmp_path / "train" / "dog" / f"{red}.png", (8, 8), (red, 0, 0))
  write_image(tmp_path / "train" / "emu" / "30.png", (8, 8), (30, 0, 0))
  for red in (40, 41):                                    # no 'dog' test images: labels still align
    write_image(tmp_path / "test" / "emu" / f"{red}.png", (8, 8), (red, 0, 0))
  write_image(tmp_path / "test" / "cat" / "50.png", (8, 8), (50, 0, 0))
  config = image_folder_config(tmp_path)
  train, test = sources.load_split(config, "train"), sources.load_split(config, "test")
  assert red_values(train) == [10, 11, 12, 20, 21, 30]
  assert train.records.label.tolist() == [0, 0, 0, 1, 1, 2]
  assert red_values(test) == [50, 40, 41]
  assert test.records.label.tolist() == [0, 2, 2]         # cat=0, emu=2 as in training
  assert train.num_classes == test.num_classes == 3
  assert not set(red_values(train)) & set(red_values(test))
  config.update(train_split="all", test_split="heldout")  # other folder names
  (tmp_path / "train").rename(tmp_path / "all")
  (tmp_path / "test").rename(tmp_path / "heldout")
  assert red_values(sources.load_split(config, "test")) == [50, 40, 41]
  assert red_values(sources.load_split(config, "train")) == [10, 11, 12, 20, 21, 30]


def test_image_folder_ignores_hidden_entries(tmp_path):
  write_image(tmp_path / "train" / "cat" / "1.png", (8, 8), (1, 0, 0))
  write_image(tmp_path / "train" / "cat" / ".2.png", (8, 8), (2, 0, 0))       # hidden file
  write_image(tmp_path / "train" / ".thumbnails" / "3.png", (8, 8), (3, 0, 0))  # hidden folder
  write_image(tmp_path / "train" / "dog" / "4.png", (8, 8), (4, 0, 0))
  (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")
  write_image(tmp_path / "test" / ".cache" / "5.png", (8, 8), (5, 0, 0))
  write_image(tmp_path / "test" / "dog" / "6.png", (8, 8), (6, 0, 0))
  config = image_folder_config(tmp_path)
  train = sources.load_split(config, "train")
  assert train.num_classes == 2
  assert red_values(train) == [1, 4] and train.records.label.tolist() == [0, 1]
  test = sources.load_split(config, "test")
  assert red_values(test) == [6] and test.records.label.tolist() == [1]


def test_image_folder_flat_split_is_unconditional(tmp_path):
  for red in (1, 2, 3):
    write_image(tmp_path / "train" / f"{red}.png", (8, 8), (red, 0, 0))
  write_image(tmp_path / "test" / "9.bmp", (8, 8), (9, 0, 0))
  (tmp_path / "train" / "LICENSE.txt").write_text("not an image")
  config = image_folder_config(tmp_path)
  train, test = sources.load_split(config, "train"), sources.load_split(config, "test")
  assert train.num_classes == test.num_classes == 0
  assert red_values(train) == [1, 2, 3] and train.records.label.tolist() == [0, 0, 0]
  assert red_values(test) == [9]


def test_image_folder_loose_images_beside_class_folders_are_an_error(tmp_path):
  write_image(tmp_path / "train" / "cat" / "1.png", (8, 8), (1, 0, 0))
  write_image(tmp_path / "train" / "stray.png", (8, 8), (2, 0, 0))
  write_image(tmp_path / "train" / "other.JPG", (8, 8), (3, 0, 0))
  write_image(tmp_path / "test" / "cat" / "4.png", (8, 8), (4, 0, 0))
  with pytest.raises(ConfigError) as info:
    sources.load_split(image_folder_config(tmp_path), "train")
  message = str(info.value)
  assert message.startswith("config.data.path: image files beside the class folders of "
                            f"{str(tmp_path / 'train')!r} have no class: ['other.JPG', 'stray.png']")


def test_image_folder_errors(tmp_path):
  config = image_folder_config(tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"config\.data\.path"):
    sources.load_split(config, "train")
  config.path = str(tmp_path)
  write_image(tmp_path / "cat" / "a.png", (8, 8), (1, 2, 3))        # class folders, no split folders
  with pytest.raises(ConfigError, match=r"config\.data\.path: no 'train' folder in .*/train/<class>/\*\.png"):
    sources.load_split(config, "train")
  (tmp_path / "cat").rename(tmp_path / "train")
  (tmp_path / "train" / "cat").mkdir()
  (tmp_path / "train" / "a.png").rename(tmp_path / "train" / "cat" / "a.png")
  assert len(sources.load_split(config, "train").records) == 1
  with pytest.raises(ConfigError, match=r"config\.data\.path: no 'test' folder"):
    sources.load_split(config, "test")                    # never the training images instead
  write_image(tmp_path / "test" / "cow" / "b.png", (8, 8), (1, 2, 3))
  with pytest.raises(ConfigError, match=r"config\.data\.test_split: .* has class folders \['cow'\], "
                     r"not among the training split 'train''s \['cat'\]"):
    sources.load_split(config, "test")
  (tmp_path / "test" / "cow").rename(tmp_path / "test" / "cat")
  (tmp_path / "test" / "cat" / "b.png").unlink()
  (tmp_path / "test" / "cat" / "readme.md").write_text("no images here")
  with pytest.raises(ConfigError, match=r"config\.data\.path: no images found under"):
    sources.load_split(config, "test")
  write_image(tmp_path / "test" / "cat" / "b.png", (8, 8), (1, 2, 3))
  config.resolution = 0
  with pytest.raises(ConfigError, match=r"config\.data\.resolution"):
    sources.load_split(config, "train")
