"""Random-access data sources: embedded digits, toy 2-D distributions, TFDS datasets, image folders.

Each source yields dicts {'x': float32 data in [-1, 1] (images NHWC), 'label': int32}. `load_split`
returns a `Source`: the random-access records plus what the model needs to know about them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from jdistill.errors import ConfigError

TOY2D = ("checkerboard", "8gaussians", "moons", "swissroll")
DIGITS_HELDOUT = 500          # fixed held-out split of scikit-learn's 1797 digits
DIGITS_SPLIT_SEED = 0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass
class ArraySource:
  """An in-memory random-access source over aligned arrays (grain's RandomAccessDataSource)."""
  x: np.ndarray
  label: np.ndarray

  def __len__(self):
    return len(self.x)

  def __getitem__(self, index):
    return {"x": self.x[index], "label": self.label[index]}


@dataclasses.dataclass
class Source:
  records: Any                 # random-access: len() and [i] -> {'x', 'label'}
  data_shape: Sequence[int]    # one example's shape, e.g. (8, 8, 1) or (2,)
  num_classes: int

  @property
  def is_image(self):
    return len(self.data_shape) == 3


def digits(split: str) -> Source:
  """scikit-learn's 8x8 digits (bundled with the package, no download), scaled to [-1, 1]."""
  from sklearn.datasets import load_digits
  data = load_digits()
  images = (data.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[..., None]
  order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(images))
  heldout, train = order[:DIGITS_HELDOUT], order[DIGITS_HELDOUT:]
  index = {"train": train, "test": heldout}[_check_split(split, ("train", "test"))]
  return Source(ArraySource(images[index], data.target[index].astype(np.int32)), (8, 8, 1), 10)


def toy2d(name: str, split: str, num_examples: int = 50_000) -> Source:
  """Generated 2-D distributions, scaled to roughly unit scale; 'test' uses a different seed."""
  seed = {"train": 0, "test": 1}[_check_split(split, ("train", "test"))]
  rng = np.random.RandomState(seed)
  n = num_examples
  if name == "checkerboard":
    x1 = rng.rand(n) * 4 - 2
    x2 = rng.rand(n) - rng.randint(0, 2, n) * 2 + (np.floor(x1) % 2)
    points = np.stack([x1, x2], 1) / 2.0
  elif name == "8gaussians":
    centers = np.array([(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4])
    points = centers[rng.randint(0, 8, n)] + 0.08 * rng.randn(n, 2)
  elif name == "moons":
    from sklearn.datasets import make_moons
    points, _ = make_moons(n, noise=0.05, random_state=seed)
    points = (points - np.array([0.5, 0.25])) / 1.2
  elif name == "swissroll":
    from sklearn.datasets import make_swiss_roll
    points, _ = make_swiss_roll(n, noise=0.3, random_state=seed)
    points = points[:, [0, 2]] / 12.0
  else:
    raise ConfigError(f"config.data.name: unknown toy2d distribution {name!r}; choose from {TOY2D}")
  return Source(ArraySource(points.astype(np.float32), np.zeros(n, np.int32)), (2,), 0)


class TfdsImageSource:
  """Random access over a prepared TFDS split (tfds.data_source), images mapped to [-1, 1]."""

  def __init__(self, name, split, data_dir, resolution):
    self._records = open_tfds_split(name, split, data_dir)
    self._resolution = resolution

  def __len__(self):
    return len(self._records)

  def __getitem__(self, index):
    record = self._records[index]
    image = _resize(np.asarray(record["image"]), self._resolution)
    return {"x": image.astype(np.float32) / 127.5 - 1.0,
            "label": np.int32(record.get("label", 0))}


def open_tfds_split(name, split, data_dir):
  """`tfds.data_source` of a dataset already prepared under `data_dir` (never downloads); a missing
  one is a ConfigError naming the directory searched and the command that prepares it."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # noqa: BLE001 - TFDS raises several types for data it cannot open
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      raise
    root = builder.data_dir_root
    raise ConfigError(
        f"config.data.data_dir: TFDS dataset config.data.name={name!r} is not prepared in "
        f"config.data.data_dir={data_dir or ''!r} (searched {builder.data_dir}); jdistill never "
        f"downloads data: prepare it with `tfds build {name} --data_dir={root} "
        "--file_format=array_record`") from e


def tfds_images(name, split, data_dir=None, resolution=None) -> Source:
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError and friends
    raise ConfigError(f"config.data.name: TFDS has no dataset {name!r} ({e})") from e
  features = builder.info.features
  shape = tuple(features["image"].shape)
  if resolution:
    shape = (resolution, resolution, shape[-1])
  elif None in shape[:2]:
    raise ConfigError(f"config.data.resolution: TFDS dataset {name!r} has images of varying size "
                      f"{shape}; set a resolution to resize them to")
  num_classes = features["label"].num_classes if "label" in features else 0
  return Source(TfdsImageSource(name, split, data_dir, resolution), shape, num_classes)


def image_folder(path, split, resolution, train_split="train") -> Source:
  """Images under `path/<split>`, resized to resolution x resolution RGB.

  Layout: `<split>/<class>/*.png` (class folders sorted; a test split's labels are the train
  split's classes, so it may lack a class but not add one) or, with no class folders, flat
  `<split>/*.png` (unconditional). The test split is its own folder, never the training images.
  Hidden entries (a leading '.') and files that are not images are ignored; image files beside
  class folders are an error (they would have no class).
  """
  from PIL import Image
  if not os.path.isdir(path):
    raise ConfigError(f"config.data.path: {path!r} is not a directory")
  if not resolution or resolution < 1:
    raise ConfigError(f"config.data.resolution: image_folder needs a resolution > 0, got {resolution!r}")
  for name in (train_split, split):
    if not os.path.isdir(os.path.join(path, name)):
      raise ConfigError(f"config.data.path: no {name!r} folder in {path!r}; image_folder reads each "
                        "split (config.data.train_split, test_split) from its own folder: "
                        f"{path}/{name}/<class>/*.png, or {path}/{name}/*.png without classes")
  root = os.path.join(path, split)
  classes = _folder_entries(os.path.join(path, train_split))[0]
  folders, loose = _folder_entries(root)
  if folders and loose:
    raise ConfigError(f"config.data.path: image files beside the class folders of {root!r} have no "
                      f"class: {loose[:5]}{' ...' if len(loose) > 5 else ''}; move them into a "
                      "class folder")
  if bool(folders) != bool(classes) or not set(folders) <= set(classes):
    raise ConfigError(f"config.data.test_split: {root!r} has class folders {folders}, not among "
                      f"the training split {train_split!r}'s {classes}")
  if folders:
    files = [(os.path.join(root, folder, f), classes.index(folder)) for folder in folders
             for f in _folder_entries(os.path.join(root, folder))[1]]
  else:
    files = [(os.path.join(root, f), 0) for f in loose]
  if not files:
    raise ConfigError(f"config.data.path: no images found under {root!r}")
  images = np.stack([_resize(np.asarray(Image.open(f).convert("RGB")), resolution) for f, _ in files])
  labels = np.array([label for _, label in files], np.int32)
  return Source(ArraySource(images.astype(np.float32) / 127.5 - 1.0, labels),
                (resolution, resolution, 3), len(classes))


def _folder_entries(folder):
  """(sorted subfolder names, sorted image file names) in `folder`, hidden entries left out."""
  names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
  return ([n for n in names if os.path.isdir(os.path.join(folder, n))],
          [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
           and os.path.isfile(os.path.join(folder, n))])


def load_split(data_config, split: str) -> Source:
  """The source named by `config.data` for 'train' or 'test'."""
  kind = data_config.source
  if kind == "digits":
    return digits(split)
  if kind == "toy2d":
    return toy2d(data_config.name, split)
  named_split = data_config.train_split if split == "train" else data_config.test_split
  if kind == "tfds":
    return tfds_images(data_config.name, named_split, data_config.get("data_dir") or None,
                       data_config.get("resolution") or None)
  if kind == "image_folder":
    return image_folder(data_config.path, named_split, data_config.resolution,
                        data_config.train_split)
  raise ConfigError(f"config.data.source: unknown source {kind!r}; "
                    "choose digits, toy2d, tfds or image_folder")


def _check_split(split, allowed):
  if split not in allowed:
    raise ValueError(f"split must be one of {allowed}, got {split!r}")
  return split


def _resize(image, resolution):
  if image.ndim == 2:
    image = image[..., None]
  if not resolution or image.shape[0] == resolution and image.shape[1] == resolution:
    return image
  from PIL import Image
  channels = image.shape[-1]
  pil = Image.fromarray(image.squeeze(-1) if channels == 1 else image)
  resized = np.asarray(pil.resize((resolution, resolution), Image.BICUBIC))
  return resized.reshape(resolution, resolution, channels)
