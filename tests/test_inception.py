"""FID InceptionV3: shapes, parameter count, weights file round trip and errors (CPU, small inputs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jdistill.eval import inception

SMALL = inception.MIN_IMAGE_SIZE  # 75x75: the smallest input the architecture accepts


@pytest.fixture(scope="module")
def variables():
  variables = inception.init_variables(jax.random.key(0), SMALL)
  # Non-trivial variances so that the round trip exercises batch_stats too (means stay 0: with
  # random weights activations are tiny and a shifted mean would zero them through the ReLUs).
  rng = np.random.RandomState(0)
  stats = traverse_util.unflatten_dict({
      k: np.asarray(v) * (rng.uniform(0.5, 1.0, v.shape).astype(np.float32) if k[-1] == "var" else 1)
      for k, v in traverse_util.flatten_dict(dict(variables["batch_stats"])).items()})
  return {"params": variables["params"], "batch_stats": stats}


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(1).uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def weights_file(variables, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "weights.npz")
  inception.save_weights(variables, path)
  return path


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(tree)), sep="/")


def test_parameter_count_of_real_size_model():
  shapes = jax.eval_shape(
      lambda rng: inception.init_variables(rng, inception.FID_IMAGE_SIZE), jax.random.key(0))
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
  # torchvision/pytorch-fid InceptionV3 without aux head: 23,834,568 - fc (2048*1000 + 1000).
  assert count == 21_785_568
  assert 21.7e6 < count < 21.9e6
  out = jax.eval_shape(
      lambda v: inception.FIDInceptionV3().apply(v, jnp.zeros((2, 64, 64, 1))), shapes)
  assert out.shape == (2, inception.FEATURE_DIM)


def test_features_shape_and_batching(variables, images):
  features = inception.make_feature_fn(variables, batch_size=2, image_size=SMALL)
  out = features(images)  # 2 batches, the last one padded
  assert out.shape == (3, 2048) and out.dtype == np.float32
  assert np.all(np.isfinite(out))
  scale = np.abs(out).max()  # random weights: activations are small, compare relative to them
  assert scale > 0
  np.testing.assert_allclose(features(images[:2]), out[:2], rtol=1e-4, atol=1e-4 * scale)
  assert np.abs(out[0] - out[1]).max() > 1e-2 * scale


def test_grayscale_is_repeated_to_rgb(variables, images):
  features = inception.make_feature_fn(variables, batch_size=2, image_size=SMALL)
  gray = images[:2, :, :, :1]
  out = features(gray)
  np.testing.assert_allclose(out, features(np.repeat(gray, 3, -1)),
                             rtol=1e-5, atol=1e-5 * np.abs(out).max())


def test_save_load_round_trip(variables, images, weights_file):
  loaded = inception.load_weights(weights_file)
  expected, got = _flat(variables), _flat(loaded)
  assert sorted(expected) == sorted(got)
  assert "params/Conv2d_1a_3x3/conv/kernel" in got
  assert "batch_stats/Conv2d_1a_3x3/bn/mean" in got
  for key in expected:
    np.testing.assert_array_equal(expected[key], got[key])
  direct = inception.make_feature_fn(variables, batch_size=2, image_size=SMALL)(images)
  from_file = inception.feature_fn(weights_file, batch_size=2, image_size=SMALL)(images)
  np.testing.assert_array_equal(direct, from_file)


def test_missing_file_raises(tmp_path):
  path = str(tmp_path / "no_such_weights.npz")
  with pytest.raises(FileNotFoundError, match="never downloads") as info:
    inception.feature_fn(path)
  assert path in str(info.value)
  assert "inception_weights" in str(info.value)


def test_mismatched_file_raises(variables, tmp_path):
  flat = _flat(variables)
  key = "params/Mixed_6b/branch7x7_2/conv/kernel"
  flat[key] = np.zeros((7, 1, 128, 128), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=key) as info:
    inception.load_weights(path)
  assert "(7, 1, 128, 128)" in str(info.value) and "(1, 7, 128, 128)" in str(info.value)

  flat = _flat(variables)
  del flat["batch_stats/Mixed_7c/branch_pool/bn/var"]
  np.savez(path, **flat)
  with pytest.raises(ValueError, match="batch_stats/Mixed_7c/branch_pool/bn/var"):
    inception.load_weights(path)


def test_convert_torch_state_dict(variables):
  torch_names = {"kernel": "conv.weight", "scale": "bn.weight", "bias": "bn.bias",
                 "mean": "bn.running_mean", "var": "bn.running_var"}
  state = {}
  for key, value in _flat(variables).items():
    _, *module, _, leaf = key.split("/")
    name = ".".join(module) + "." + torch_names[leaf]
    state[name] = value.transpose(3, 2, 0, 1) if leaf == "kernel" else value
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.array(0)
  state["fc.weight"] = np.zeros((1008, 2048), np.float32)
  state["fc.bias"] = np.zeros((1008,), np.float32)
  converted = _flat(inception.convert_torch_state_dict(state))
  expected = _flat(variables)
  assert sorted(converted) == sorted(expected)
  for key in expected:
    np.testing.assert_array_equal(converted[key], expected[key])
  with pytest.raises(ValueError, match="params/Mixed_5b/branch1x1/conv/kernel"):
    bad = dict(state)
    bad["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
    inception.convert_torch_state_dict(bad)
