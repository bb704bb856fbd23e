"""The U-Net's convolution equals flax's nn.Conv, also where it runs as a matmul (maps smaller
than the kernel)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.models.unet import Conv, GroupNorm

from conftest import perturbed


@pytest.mark.parametrize("shape, features, kernel, stride", [
    ((2, 2, 3, 6), 4, 3, 1),     # 2x3 map, 3x3 kernel: the matmul path
    ((2, 1, 1, 6), 4, 3, 1),     # 1x1: only the centre tap sees data
    ((2, 2, 2, 6), 4, 3, 2),     # stride 2 onto 1x1
    ((2, 4, 4, 6), 4, 3, 2),     # large enough: XLA's convolution
    ((2, 5, 5, 3), 4, 3, 1),
])
def test_conv_equals_nn_conv(shape, features, kernel, stride):
  x = jax.random.normal(jax.random.key(0), shape)
  ours = Conv(features, (kernel, kernel), (stride, stride))
  reference = nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME")
  params = nn.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference.init(jax.random.key(1), x))
  params["params"]["bias"] = jax.random.normal(jax.random.key(2), (features,))
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  expected = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected)


@pytest.mark.parametrize("shape,groups", [((4, 8, 8, 32), 8), ((2, 4, 4, 64), 8), ((3, 16, 16, 16), 4),
                                          ((2, 6, 5, 12), 3)])
def test_group_norm_equals_nn_group_norm(shape, groups):
  """The per-channel-sum GroupNorm gives nn.GroupNorm's values and gradients (x and params) with
  the same param tree, so checkpoints of either load into the other."""
  x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5
  ours, reference = GroupNorm(groups), nn.GroupNorm(num_groups=groups)
  params = nn.unbox(ours.init(jax.random.key(1), x))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference.init(jax.random.key(1), x))
  params = perturbed(params, 0.3, 2)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * x)
  np.testing.assert_allclose(ours.apply(params, x), reference.apply(params, x), atol=2e-5, rtol=1e-5)
  (g_params, g_x), (r_params, r_x) = (jax.grad(loss(m), argnums=(0, 1))(params, x)
                                      for m in (ours, reference))
  np.testing.assert_allclose(g_x, r_x, atol=2e-4, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g_params), jax.tree.leaves(r_params)):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_group_norm_bfloat16_keeps_float32_statistics():
  x = 100.0 + jax.random.normal(jax.random.key(0), (2, 8, 8, 16))   # large mean: bf16 sums would fail
  params = nn.unbox(GroupNorm(4).init(jax.random.key(1), x))
  y = GroupNorm(4, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  expected = nn.GroupNorm(num_groups=4).apply(params, x.astype(jnp.bfloat16).astype(jnp.float32))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)
