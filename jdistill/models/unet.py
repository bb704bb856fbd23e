"""A Flax Linen U-Net for diffusion (DDPM / progressive-distillation style).

Residual blocks with GroupNorm, a logSNR embedding added in every block, self-attention at chosen
resolutions, dropout, channel multipliers per level, and an optional class label with a null
class (index `num_classes`) for classifier-free guidance. Every kernel carries logical axis names
so a rules table (jdistill/train/partitioning.py) can shard it over the mesh.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jdistill.diffusion.schedules import LOGSNR_MAX, LOGSNR_MIN


def conv_init(scale=1.0):
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(scale, "fan_avg", "uniform"),
      ("conv_height", "conv_width", "channels_in", "channels_out"))


def dense_init(scale=1.0):
  return nn.with_logical_partitioning(
      nn.initializers.variance_scaling(scale, "fan_avg", "uniform"), ("embed_in", "embed_out"))


def bias_init(axis="channels_out"):
  return nn.with_logical_partitioning(nn.initializers.zeros, (axis,))


class GroupNorm(nn.Module):
  """nn.GroupNorm (epsilon 1e-6, params `scale` and `bias`), computed from per-channel sums over
  the spatial axes, grouped and broadcast back by a (C, G) membership matmul. XLA:CPU fuses this
  form better: 1.4-1.7x faster than nn.GroupNorm for norm + SiLU forward and backward, ~6% on the
  whole 32x32 progressive step (benchmarks/README.md). Statistics in float32 at HIGHEST matmul
  precision (a TPU would otherwise round the sums to bfloat16)."""
  groups: int
  dtype: jnp.dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.groups:
      raise ValueError(f"GroupNorm: {c} channels do not split into {self.groups} groups")
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (c,))
    x32 = x.astype(jnp.float32)
    per_channel = x32.reshape(x.shape[0], -1, c)
    member = jnp.asarray(  # member[c, g] = 1 if channel c is in group g
        (jnp.arange(c)[:, None] // (c // self.groups)) == jnp.arange(self.groups), jnp.float32)
    matmul = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    count = per_channel.shape[1] * (c // self.groups)
    mean = matmul(jnp.sum(per_channel, 1), member) / count                         # (B, G)
    var = jnp.maximum(matmul(jnp.sum(per_channel * per_channel, 1), member) / count - mean ** 2, 0.0)
    broadcast = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
    mean_c = matmul(mean, member.T).reshape(broadcast)
    gain_c = (matmul(jax.lax.rsqrt(var + self.epsilon), member.T) * scale).reshape(broadcast)
    return ((x32 - mean_c) * gain_c + bias).astype(self.dtype)


class Conv(nn.Module):
  """A 'SAME' convolution with nn.Conv's params (kernel HWIO, bias). On feature maps smaller than
  the kernel (the deepest levels of a U-Net on small images) it is computed as one matmul over
  gathered patches: XLA swaps such a convolution's operands into a form that its CPU backend runs
  5-40x slower than the matmul (benchmarks/README.md)."""
  features: int
  kernel_size: tuple = (3, 3)
  strides: tuple = (1, 1)
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = conv_init()
  bias_init: Callable = bias_init()

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", self.bias_init, (self.features,))
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    if x.shape[1] < self.kernel_size[0] or x.shape[2] < self.kernel_size[1]:
      y = conv_as_matmul(x, kernel, self.strides)
    else:
      y = jax.lax.conv_general_dilated(x, kernel, self.strides, "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def conv_as_matmul(x, kernel, strides):
  """A 'SAME' NHWC convolution as patches @ kernel, skipping taps that only ever see padding."""
  kh, kw, _, features = kernel.shape
  (sh, sw), (_, h, w, _) = strides, x.shape
  out_h, out_w = -(-h // sh), -(-w // sw)
  pad_h, pad_w = max((out_h - 1) * sh + kh - h, 0), max((out_w - 1) * sw + kw - w, 0)
  top, left = pad_h // 2, pad_w // 2
  x = jnp.pad(x, ((0, 0), (top, pad_h - top), (left, pad_w - left), (0, 0)))
  sees_data = lambda tap, stride, size, before, n: any(
      before <= tap + k * stride < before + size for k in range(n))
  taps = [(i, j) for i in range(kh) for j in range(kw)
          if sees_data(i, sh, h, top, out_h) and sees_data(j, sw, w, left, out_w)]
  patches = jnp.concatenate([x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw]
                             for i, j in taps], axis=-1)
  return patches @ jnp.concatenate([kernel[i, j] for i, j in taps], axis=0)


def conv(features, dtype, kernel=3, stride=1, scale=1.0, name=None):
  return Conv(features, (kernel, kernel), strides=(stride, stride), dtype=dtype,
              kernel_init=conv_init(scale), bias_init=bias_init(), name=name)


def dense(features, dtype, scale=1.0, name=None):
  return nn.Dense(features, dtype=dtype, kernel_init=dense_init(scale),
                  bias_init=bias_init("embed_out"), name=name)


def logsnr_time(logsnr):
  """1000 t' with t' = arctan(exp(-logsnr / 2)) / (pi / 2) in [0, 1]: the cosine schedule's time."""
  logsnr = jnp.clip(logsnr, LOGSNR_MIN, LOGSNR_MAX)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * math.pi) * 1000.0


def logsnr_embedding(logsnr, dim: int, max_period: float = 10000.0):
  """Sinusoidal embedding of logsnr_time(logsnr)."""
  t = logsnr_time(logsnr)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


MAX_STEPS = 16   # largest sampler step count a step-conditioned generator can be told


def add_step_embedding(emb, steps: Optional[jnp.ndarray], dtype):
  """emb + E[K] for a step-conditioned generator (TDM-unify): K is the sampler's step count.
  E starts at zero, so a generator initialised from the teacher starts as the teacher."""
  if steps is None:
    return emb
  table = nn.Embed(MAX_STEPS + 1, emb.shape[-1], dtype=dtype, name="step_embedding",
                   embedding_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               ("classes", "embed_out")))
  return emb + table(jnp.clip(steps, 0, MAX_STEPS).astype(jnp.int32))


def zero_fourier_features(value, width: int):
  """phi(1000 value): [sin, cos] of a per-example scalar at width / 8 frequencies."""
  half = width // 8
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = 1000.0 * value[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def add_zero_fourier_embedding(emb, value: Optional[jnp.ndarray], name: str, dtype):
  """emb + W phi(1000 value): phi the sinusoidal features of a per-example scalar (scaled like a
  diffusion timestep), W a zero-initialised layer `name`, so the network starts as it was without
  it, at every value. None: emb unchanged."""
  if value is None:
    return emb
  features = zero_fourier_features(value, emb.shape[-1])
  layer = nn.Dense(emb.shape[-1], dtype=dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                            ("embed_in", "embed_out")),
                   bias_init=bias_init("embed_out"))
  return emb + layer(features)


def add_interval_embedding(emb, interval: Optional[jnp.ndarray], dtype):
  """A flow map (MeanFlow) is told h = t - r in [0, 1], the flow-time interval its output averages
  the velocity over; it starts as the teacher (its velocity) at every h."""
  return add_zero_fourier_embedding(emb, interval, "interval_embedding", dtype)


def add_guidance_embedding(emb, guidance: Optional[jnp.ndarray], dtype):
  """A guidance-conditioned student (guided distillation, LCM's w-embedding) is told its
  classifier-free guidance weight w; it starts as the conditional teacher at every w."""
  return add_zero_fourier_embedding(emb, guidance, "guidance_embedding", dtype)


class ResBlock(nn.Module):
  features: int
  groups: int
  dropout: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = conv(self.features, self.dtype)(nn.swish(GroupNorm(self.groups, self.dtype)(x)))
    h = h + dense(self.features, self.dtype)(nn.swish(emb))[:, None, None, :]
    h = nn.swish(GroupNorm(self.groups, self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.features, self.dtype, scale=1e-10)(h)  # zero-ish init: block starts as identity
    if x.shape[-1] != self.features:
      x = conv(self.features, self.dtype, kernel=1)(x)
    return x + h


class AttentionBlock(nn.Module):
  heads: int
  groups: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, self.dtype)(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.heads, dtype=self.dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("embed_in", "heads", "head_dim")),
        out_kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ("heads", "head_dim", "embed_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")),
        out_bias_init=bias_init("embed_out"))(y, y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """U-Net denoiser: (z_t, logsnr, label) -> raw output with `out_channels` channels."""
  out_channels: int
  channels: int = 64
  channel_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4,)
  num_heads: int = 1
  dropout: float = 0.0
  num_classes: int = 0          # > 0: class-conditional, label `num_classes` is the null class
  norm_groups: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, logsnr, label: Optional[jnp.ndarray] = None, train: bool = False,
               capture_features: bool = False, steps: Optional[jnp.ndarray] = None,
               interval: Optional[jnp.ndarray] = None, guidance: Optional[jnp.ndarray] = None):
    emb_dim = 4 * self.channels
    emb = logsnr_embedding(logsnr, self.channels)
    emb = dense(emb_dim, self.dtype)(emb)
    emb = dense(emb_dim, self.dtype)(nn.swish(emb))
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((z.shape[0],), self.num_classes, jnp.int32)
      emb = emb + nn.Embed(self.num_classes + 1, emb_dim, dtype=self.dtype,
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(0.02), ("classes", "embed_out")))(label)
    emb = add_step_embedding(emb, steps, self.dtype)
    emb = add_interval_embedding(emb, interval, self.dtype)
    emb = add_guidance_embedding(emb, guidance, self.dtype)

    h = conv(self.channels, self.dtype)(z.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = ResBlock(self.channels * mult, self.norm_groups, self.dropout, self.dtype)(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = AttentionBlock(self.num_heads, self.norm_groups, self.dtype)(h)
        skips.append(h)
      if capture_features:
        self.sow("intermediates", f"down_{level}", h)
      if level != len(self.channel_mult) - 1:
        h = conv(h.shape[-1], self.dtype, stride=2)(h)
        skips.append(h)

    h = ResBlock(h.shape[-1], self.norm_groups, self.dropout, self.dtype)(h, emb, train)
    h = AttentionBlock(self.num_heads, self.norm_groups, self.dtype)(h)
    h = ResBlock(h.shape[-1], self.norm_groups, self.dropout, self.dtype)(h, emb, train)
    if capture_features:
      self.sow("intermediates", "bottleneck", h)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = ResBlock(self.channels * mult, self.norm_groups, self.dropout, self.dtype)(h, emb, train)
        if h.shape[1] in self.attention_resolutions:
          h = AttentionBlock(self.num_heads, self.norm_groups, self.dtype)(h)
      if capture_features:
        self.sow("intermediates", f"up_{level}", h)
      if level != 0:
        h = conv(h.shape[-1], self.dtype)(upsample_2x(h))
    assert not skips
    h = nn.swish(GroupNorm(self.norm_groups, self.dtype)(h))
    return conv(self.out_channels, self.dtype, scale=1e-10)(h).astype(jnp.float32)


def upsample_2x(x):
  """Nearest-neighbour 2x upsampling."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
