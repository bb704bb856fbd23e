"""A Flax Linen DiT (Peebles & Xie 2023), laid out like diffusers' DiTTransformer2DModel.

Patches (a convolution with kernel = stride = patch size) plus a fixed 2-D sin-cos position
embedding; a conditioning vector c = MLP(sinusoid(time)) + label embedding (+ the zero-initialised
embeddings of a generator's step count, a flow map's interval and a student's guidance weight);
`depth` adaLN-Zero blocks (LayerNorm without affine, shift / scale / gate from c, self-attention,
a GELU(tanh) MLP of ratio 4); the final adaLN layer; unpatchify. Submodules carry diffusers'
names so `dit_params_from_diffusers` maps a diffusers state dict onto these params key by key. diffusers keeps a copy of the time and label embedders in
every block (all equal in DiT checkpoints, which share one); here there is one.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdistill.models.unet import (add_guidance_embedding, add_interval_embedding, add_step_embedding,
                                  bias_init, conv_init, dense, logsnr_time)

FREQUENCY_CHANNELS = 256        # the sinusoidal time embedding's width (diffusers' Timesteps(256))


def timestep_embedding(t, dim: int = FREQUENCY_CHANNELS, max_period: float = 10000.0):
  """diffusers' Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): [cos, sin] of t f_k,
  f_k = max_period^(-k / (dim / 2 - 1)): the exp of diffusers' float32 exponent, rounded once."""
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - 1)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  angles = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def position_embedding(dim: int, height: int, width: int) -> np.ndarray:
  """diffusers' get_2d_sincos_pos_embed: patch (i, j) of the row-major grid -> [sincos(j),
  sincos(i)], sincos(p) = [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim / 4))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")

  def sincos(pos):
    angles = np.outer(pos.ravel(), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  return np.concatenate([sincos(cols), sincos(rows)], axis=1).astype(np.float32)


def zero_dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, name=name, bias_init=bias_init("embed_out"),
                  kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("embed_in", "embed_out")))


def layer_norm(x, epsilon, dtype):
  return nn.LayerNorm(epsilon=epsilon, use_bias=False, use_scale=False, dtype=dtype)(x)


def modulate(x, shift, scale):
  return x * (1 + scale) + shift


class TimestepEmbedding(nn.Module):
  """sinusoid(t) -> linear_1 -> SiLU -> linear_2."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = dense(self.features, self.dtype, name="linear_1")(timestep_embedding(t))
    return dense(self.features, self.dtype, name="linear_2")(nn.silu(h))


class DiTBlock(nn.Module):
  """adaLN-Zero block: its gates start at zero, so a fresh block is the identity."""
  num_heads: int
  dropout: float = 0.0
  norm_eps: float = 1e-5          # the MLP's LayerNorm (diffusers' norm_eps); attention's is 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c, train: bool):
    d = x.shape[-1]
    modulation = zero_dense(6 * d, self.dtype, "norm1_linear")(nn.silu(c))[:, None]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, -1)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    h = modulate(layer_norm(x, 1e-6, self.dtype), shift_msa, scale_msa)
    h = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, name="attn1",
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("embed_in", "heads", "head_dim")),
        out_kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("heads", "head_dim", "embed_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
        out_bias_init=bias_init("embed_out"))(h, h)
    x = x + gate_msa * drop(h)
    h = modulate(layer_norm(x, self.norm_eps, self.dtype), shift_mlp, scale_mlp)
    h = nn.gelu(dense(4 * d, self.dtype, name="ff_in")(h), approximate=True)
    h = dense(d, self.dtype, name="ff_out")(drop(h))
    return x + gate_mlp * h


class DiT(nn.Module):
  """DiT denoiser: (z_t, time, label) -> raw output with `out_channels` channels. `time` is logSNR
  (mapped to the U-Net's 1000 t') if `time_is_logsnr`, else a timestep embedded as it comes
  (diffusers' in [0, 1000), or the flow path's 1000 tau)."""
  out_channels: int
  hidden: int = 128
  patch_size: int = 2
  depth: int = 7
  num_heads: int = 4
  dropout: float = 0.0
  num_classes: int = 0          # > 0: class-conditional, label `num_classes` is the null class
  time_is_logsnr: bool = True
  norm_eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, time, label: Optional[jnp.ndarray] = None, train: bool = False,
               capture_features: bool = False, steps: Optional[jnp.ndarray] = None,
               interval: Optional[jnp.ndarray] = None, guidance: Optional[jnp.ndarray] = None):
    batch, height, width, _ = z.shape
    p, d = self.patch_size, self.hidden
    c = TimestepEmbedding(d, self.dtype, name="timestep_embedder")(
        logsnr_time(time) if self.time_is_logsnr else time)
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((batch,), self.num_classes, jnp.int32)
      c = c + nn.Embed(self.num_classes + 1, d, dtype=self.dtype, name="class_embedder",
                       embedding_init=nn.with_logical_partitioning(
                           nn.initializers.normal(0.02), ("classes", "embed_out")))(label)
    c = add_step_embedding(c, steps, self.dtype)
    c = add_interval_embedding(c, interval, self.dtype)
    c = add_guidance_embedding(c, guidance, self.dtype)

    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="pos_embed",
                kernel_init=conv_init(), bias_init=bias_init())(z.astype(self.dtype))
    rows, cols = height // p, width // p
    x = x.reshape(batch, rows * cols, d) + position_embedding(d, rows, cols).astype(self.dtype)
    for i in range(self.depth):
      x = DiTBlock(self.num_heads, self.dropout, self.norm_eps, self.dtype,
                   name=f"transformer_blocks_{i}")(x, c, train)
      if capture_features:
        self.sow("intermediates", f"block_{i}", x)
        if i == (self.depth - 1) // 2:
          self.sow("intermediates", "bottleneck", x)

    shift_scale = zero_dense(2 * d, self.dtype, "proj_out_1")(nn.silu(c))[:, None]
    shift, scale = jnp.split(shift_scale, 2, -1)
    x = modulate(layer_norm(x, 1e-6, self.dtype), shift, scale)
    x = zero_dense(p * p * self.out_channels, self.dtype, "proj_out_2")(x)
    x = x.reshape(batch, rows, cols, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, self.out_channels).astype(jnp.float32)
