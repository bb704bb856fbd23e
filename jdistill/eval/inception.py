"""InceptionV3 pool3 features for FID (the pytorch-fid / TTUR "FID Inception" variant), in Flax Linen.

jdistill never downloads weights. `feature_fn(path)` loads them from a `.npz` file that you supply
(config.eval.inception_weights). Its keys are the flattened Flax variable paths joined with '/':

    params/Conv2d_1a_3x3/conv/kernel          (3, 3, 3, 32)
    params/Conv2d_1a_3x3/bn/scale, .../bias   (32,)
    batch_stats/Conv2d_1a_3x3/bn/mean, .../var
    params/Mixed_5b/branch1x1/conv/kernel     ...

`save_weights(variables, path)` / `load_weights(path)` write and read that format.

Converting the standard pytorch-fid weights (`pt_inception-2015-12-05-6726825d.pth`)
-------------------------------------------------------------------------------------
Module names are the same as in pytorch-fid's `FIDInceptionA/C/E_1/E_2` model (Conv2d_1a_3x3,
Mixed_5b.branch5x5_1, Mixed_7c.branch3x3dbl_3b, ...), so the mapping is one to one:

    torch '<m>.conv.weight'     (O, I, H, W) -> 'params/<m>/conv/kernel'   (H, W, I, O)  [transpose 2,3,1,0]
    torch '<m>.bn.weight'                    -> 'params/<m>/bn/scale'
    torch '<m>.bn.bias'                      -> 'params/<m>/bn/bias'
    torch '<m>.bn.running_mean'              -> 'batch_stats/<m>/bn/mean'
    torch '<m>.bn.running_var'               -> 'batch_stats/<m>/bn/var'
    '.' in <m> becomes '/'; 'fc.*' (the 1008-way classifier), 'AuxLogits.*' and
    '*.num_batches_tracked' are not needed and are dropped.

`convert_torch_state_dict` does exactly this on a dict of numpy arrays (it does not import torch).
In an environment that has torch (jdistill does not need it):

    import torch
    from jdistill.eval import inception
    state = torch.load("pt_inception-2015-12-05-6726825d.pth", map_location="cpu")
    variables = inception.convert_torch_state_dict({k: v.numpy() for k, v in state.items()})
    inception.save_weights(variables, "inception_fid.npz")

then set config.eval.inception_weights=inception_fid.npz. `load_weights` checks every key and shape.

Preprocessing matches pytorch-fid: images in [-1, 1] (pytorch-fid maps [0, 1] to [-1, 1] itself),
grayscale repeated to 3 channels, bilinear resize to 299x299 without antialiasing (like
torch's F.interpolate(mode='bilinear', align_corners=False)).
"""
from __future__ import annotations

import functools
import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

FID_IMAGE_SIZE = 299
MIN_IMAGE_SIZE = 75  # the smallest input for which every stride-2 stage still has a pixel
FEATURE_DIM = 2048


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, inference statistics) -> ReLU."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # FID Inception averages only over real pixels (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b ('avg', FID's E_1: avg-pool without padded pixels) / Mixed_7c ('max', E_2)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID InceptionV3 up to pool3. Input: NHWC in [-1, 1], 1 or 3 channels, any size.

  Images are resized (bilinear, no antialiasing) to `image_size` x `image_size`; 299 is the standard
  FID setting, smaller sizes (>= 75) are only meant for tests. Output: (N, 2048) pool3 features.
  """
  image_size: int = FID_IMAGE_SIZE

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"expected NHWC images with 1 or 3 channels, got shape {x.shape}")
    if self.image_size < MIN_IMAGE_SIZE:
      raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    size = self.image_size
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, 3), method="bilinear", antialias=False)
    x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # pool3


# ----------------------------------------------------------------------------- weights I/O


def init_variables(rng, image_size: int = MIN_IMAGE_SIZE):
  """Random variables (params + batch_stats); their shapes do not depend on `image_size`."""
  return FIDInceptionV3(image_size).init(rng, jnp.zeros((1, image_size, image_size, 3)))


def _flatten(variables) -> dict:
  flat = traverse_util.flatten_dict(_unfreeze(variables), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _unfreeze(tree):
  if isinstance(tree, Mapping):
    return {k: _unfreeze(v) for k, v in tree.items()}
  return tree


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict:
  shapes = jax.eval_shape(init_variables, jax.random.key(0))
  flat = traverse_util.flatten_dict(_unfreeze(shapes), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def save_weights(variables, path: str) -> None:
  """Writes variables ({'params': ..., 'batch_stats': ...}) as a '/'-keyed .npz at exactly `path`."""
  flat = _flatten(variables)
  with open(path, "wb") as f:
    np.savez(f, **flat)


def _check_shapes(flat: Mapping[str, np.ndarray], path: str) -> None:
  expected = _expected_shapes()
  for key in sorted(set(expected) | set(flat)):
    if key not in flat:
      raise ValueError(f"InceptionV3 weights {path!r}: missing key {key!r} "
                       f"(expected shape {expected[key]})")
    if key not in expected:
      raise ValueError(f"InceptionV3 weights {path!r}: unexpected key {key!r} "
                       f"(shape {tuple(flat[key].shape)}); not part of FID InceptionV3")
    if tuple(flat[key].shape) != expected[key]:
      raise ValueError(f"InceptionV3 weights {path!r}: key {key!r} has shape "
                       f"{tuple(flat[key].shape)}, expected {expected[key]}")


def load_weights(path: str) -> dict:
  """Reads and checks a '/'-keyed .npz; returns {'params': ..., 'batch_stats': ...} (float32)."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(
        f"InceptionV3 FID weights file {path!r} not found. jdistill never downloads weights: "
        "pass the path of a .npz you have via config.eval.inception_weights (see "
        "jdistill/eval/inception.py for converting pytorch-fid's pt_inception-2015-12-05 weights)")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"InceptionV3 weights {path!r}: not a readable .npz file ({e})") from e
  _check_shapes(flat, path)
  return traverse_util.unflatten_dict(flat, sep="/")


def convert_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid FIDInceptionV3 state dict (numpy arrays, torch names) -> Flax variables.

  Drops fc.*, AuxLogits.* and *.num_batches_tracked; raises ValueError on any other unknown name.
  The result is checked against the model's keys and shapes.
  """
  suffixes = {
      "conv.weight": ("params", "conv", "kernel"),
      "bn.weight": ("params", "bn", "scale"),
      "bn.bias": ("params", "bn", "bias"),
      "bn.running_mean": ("batch_stats", "bn", "mean"),
      "bn.running_var": ("batch_stats", "bn", "var"),
  }
  flat = {}
  for name, value in state_dict.items():
    if name.startswith("module."):
      name = name[len("module."):]
    if (name.startswith(("fc.", "AuxLogits.")) or name.endswith("num_batches_tracked")):
      continue
    for suffix, (collection, layer, leaf) in suffixes.items():
      if name.endswith("." + suffix):
        module = name[:-len(suffix) - 1].replace(".", "/")
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
          if value.ndim != 4:
            raise ValueError(f"torch weight {name!r}: expected a 4-D conv weight, got {value.shape}")
          value = value.transpose(2, 3, 1, 0)  # (O, I, H, W) -> (H, W, I, O)
        flat[f"{collection}/{module}/{layer}/{leaf}"] = value
        break
    else:
      raise ValueError(f"torch weight {name!r} has no counterpart in FID InceptionV3")
  _check_shapes(flat, "<converted torch state dict>")
  return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------- features


@functools.lru_cache(maxsize=None)
def _jitted_apply(image_size: int):
  """One jitted forward per image size, shared by all feature functions (compiles once per shape)."""
  model = FIDInceptionV3(image_size)
  return jax.jit(model.apply)


def make_feature_fn(variables, batch_size: int = 50, image_size: int = FID_IMAGE_SIZE):
  """Images (numpy NHWC in [-1, 1], 1 or 3 channels, any size) -> (N, 2048) float32 numpy.

  The forward pass is jitted and run in batches of `batch_size`; the last batch is padded to
  the batch size so that each input resolution compiles once.
  """
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  apply = _jitted_apply(image_size)

  def features(images):
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"inception features: expected NHWC images with 1 or 3 channels, "
                       f"got shape {images.shape}")
    n = len(images)
    if n == 0:
      return np.zeros((0, FEATURE_DIM), np.float32)
    size = min(batch_size, n)
    out = []
    for start in range(0, n, size):
      chunk = images[start:start + size]
      valid = len(chunk)
      if valid < size:
        chunk = np.concatenate([chunk, np.zeros((size - valid, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(apply(variables, jnp.asarray(chunk)))[:valid])
    return np.concatenate(out).astype(np.float32)

  return features


def feature_fn(weights_path: str, batch_size: int = 50, image_size: int = FID_IMAGE_SIZE):
  """The FID feature function with weights from `weights_path` (a '/'-keyed .npz; no downloads)."""
  return make_feature_fn(load_weights(weights_path), batch_size=batch_size, image_size=image_size)
