"""The U-Net's convolution equals flax's nn.Conv, also where it runs as a matmul (maps smaller
than the kernel)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.models.unet import Conv


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
