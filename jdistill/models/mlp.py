"""A small residual MLP denoiser for 2-D toy data."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from jdistill.models.unet import (add_guidance_embedding, add_interval_embedding, add_step_embedding,
                                  dense, logsnr_embedding)


class MLPDenoiser(nn.Module):
  """(z_t (B, D), logsnr (B,), label) -> raw output (B, out_channels)."""
  out_channels: int
  hidden: int = 256
  depth: int = 3
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, label: Optional[jnp.ndarray] = None, train: bool = False,
               capture_features: bool = False, steps: Optional[jnp.ndarray] = None,
               interval: Optional[jnp.ndarray] = None, guidance: Optional[jnp.ndarray] = None):
    emb = dense(self.hidden, self.dtype)(logsnr_embedding(logsnr, 64))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((z.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, self.hidden,
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ("classes", "embed_out")))(label)
    emb = add_step_embedding(emb, steps, self.dtype)
    emb = add_interval_embedding(emb, interval, self.dtype)
    emb = add_guidance_embedding(emb, guidance, self.dtype)
    h = dense(self.hidden, self.dtype)(z.astype(self.dtype))
    for _ in range(self.depth):
      h = h + dense(self.hidden, self.dtype)(nn.swish(dense(self.hidden, self.dtype)(nn.swish(h + emb))))
    if capture_features:
      self.sow("intermediates", "bottleneck", h)
    return dense(self.out_channels, self.dtype)(nn.swish(h)).astype(jnp.float32)
