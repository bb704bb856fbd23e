"""diffusers' UNet2DModel in Flax Linen, built from its config.json (`from_config`).

Module names follow diffusers' parameter names (`down_blocks_0/resnets_1/conv1` holds
`down_blocks.0.resnets.1.conv1`), so jdistill/convert.py maps a state dict key by key. The
network takes NHWC z and diffusers' own timestep, and returns NHWC output.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdistill.errors import ConfigError
from jdistill.models.unet import GroupNorm, add_step_embedding, bias_init, conv_init, dense_init

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
TIME_EMBEDDINGS = ("positional", "fourier")


class Conv(nn.Module):
  """torch.nn.Conv2d with explicit zero padding (`padding`: (before, after) on both spatial
  axes), kernel HWIO."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: Tuple[int, int] = (1, 1)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_init(), (k, k, x.shape[-1], self.features), self.dtype)
    bias = self.param("bias", bias_init(), (self.features,), self.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, (self.stride,) * 2,
                                     [tuple(self.padding)] * 2,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


def dense(features, dtype, name=None):
  return nn.Dense(features, dtype=dtype, param_dtype=dtype, kernel_init=dense_init(),
                  bias_init=bias_init("embed_out"), name=name)


def norm(groups, eps, dtype, name):
  return GroupNorm(groups, dtype, eps, name=name)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float):
  """diffusers' get_timestep_embedding (max period 10000)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  angles = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResnetBlock(nn.Module):
  """ResnetBlock2D: norm, SiLU, conv, + time projection (or scale-shift), norm, SiLU, dropout,
  conv; a 1x1 shortcut conv when the channels change; / output_scale_factor."""
  features: int
  groups: int
  eps: float
  dropout: float
  scale_shift: bool
  output_scale: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, emb, train: bool):
    h = Conv(self.features, dtype=self.dtype, name="conv1")(
        nn.swish(norm(self.groups, self.eps, self.dtype, "norm1")(x)))
    emb = dense(self.features * (2 if self.scale_shift else 1), self.dtype,
                "time_emb_proj")(nn.swish(emb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = norm(self.groups, self.eps, self.dtype, "norm2")(h) * (1 + scale) + shift
    else:
      h = norm(self.groups, self.eps, self.dtype, "norm2")(h + emb)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    h = Conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, kernel_size=1, padding=(0, 0), dtype=self.dtype,
               name="conv_shortcut")(x)
    return (x + h) / self.output_scale


class Attention(nn.Module):
  """diffusers' Attention of a UNet2D block: optional GroupNorm, q/k/v/out projections over the
  pixels, heads of `head_dim` channels, a residual, / output_scale."""
  head_dim: int
  groups: Optional[int]
  eps: float
  output_scale: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    y = x if self.groups is None else norm(self.groups, self.eps, self.dtype, "group_norm")(x)
    y = y.reshape(b, height * width, c)
    heads = c // self.head_dim
    split = lambda a: a.reshape(b, height * width, heads, self.head_dim)
    q, k, v = (split(dense(c, self.dtype, name)(y)) for name in ("to_q", "to_k", "to_v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, height * width, c)
    y = dense(c, self.dtype, "to_out_0")(y).reshape(b, height, width, c)
    return (y + x) / self.output_scale


@dataclasses.dataclass(frozen=True)
class Spec:
  """The fields of a UNet2DModel config.json that shape the network (`from_config`)."""
  out_channels: int
  block_out_channels: Tuple[int, ...]
  down_block_types: Tuple[str, ...]
  up_block_types: Tuple[str, ...]
  layers_per_block: int = 2
  mid_block: bool = True
  add_attention: bool = True
  attention_head_dim: Optional[int] = 8
  norm_num_groups: int = 32
  attn_norm_num_groups: Optional[int] = None
  norm_eps: float = 1e-5
  time_embedding_type: str = "positional"
  time_embedding_dim: Optional[int] = None
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  resnet_time_scale_shift: str = "default"
  center_input_sample: bool = False
  num_class_embeds: int = 0
  dropout: float = 0.0

  def resnet(self, features, dtype, name, output_scale=1.0):
    return ResnetBlock(features, self.norm_num_groups, self.norm_eps, self.dropout,
                       self.resnet_time_scale_shift == "scale_shift", output_scale, dtype,
                       name=name)

  def attention(self, channels, dtype, name, groups=-1, output_scale=1.0):
    return Attention(self.attention_head_dim or channels,
                     self.norm_num_groups if groups == -1 else groups, self.norm_eps, output_scale,
                     dtype, name=name)


class DownBlock(nn.Module):
  """DownBlock2D / AttnDownBlock2D: resnets (each followed by attention), then a stride-2 conv."""
  spec: Spec
  features: int
  attention: bool
  downsample: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, emb, train: bool):
    outputs = []
    for j in range(self.spec.layers_per_block):
      h = self.spec.resnet(self.features, self.dtype, f"resnets_{j}")(h, emb, train)
      if self.attention:
        h = self.spec.attention(self.features, self.dtype, f"attentions_{j}")(h)
      outputs.append(h)
    if self.downsample:             # Downsample2D: padding 0 pads only the bottom and right
      pad = self.spec.downsample_padding
      h = Resample(self.features, stride=2, padding=(pad, pad) if pad else (0, 1),
                   dtype=self.dtype, name="downsamplers_0")(h)
      outputs.append(h)
    return h, outputs


class UpBlock(nn.Module):
  """UpBlock2D / AttnUpBlock2D: resnets on [h, skip] (each followed by attention), then nearest
  2x upsampling and a conv."""
  spec: Spec
  features: int
  attention: bool
  upsample: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, skips, emb, train: bool):
    for j in range(self.spec.layers_per_block + 1):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = self.spec.resnet(self.features, self.dtype, f"resnets_{j}")(h, emb, train)
      if self.attention:
        h = self.spec.attention(self.features, self.dtype, f"attentions_{j}")(h)
    if self.upsample:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = Resample(self.features, dtype=self.dtype, name="upsamplers_0")(h)
    return h


class MidBlock(nn.Module):
  """UNetMidBlock2D: resnet, attention (unless add_attention is off), resnet."""
  spec: Spec
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, emb, train: bool):
    spec, scale, c = self.spec, self.spec.mid_block_scale_factor, h.shape[-1]
    groups = spec.attn_norm_num_groups or (
        spec.norm_num_groups if spec.resnet_time_scale_shift == "default" else None)
    h = spec.resnet(c, self.dtype, "resnets_0", scale)(h, emb, train)
    if spec.add_attention:
      h = spec.attention(c, self.dtype, "attentions_0", groups, scale)(h)
    return spec.resnet(c, self.dtype, "resnets_1", scale)(h, emb, train)


class Resample(nn.Module):
  """Downsample2D / Upsample2D's conv (diffusers keeps it under `conv`)."""
  features: int
  stride: int = 1
  padding: Tuple[int, int] = (1, 1)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    return Conv(self.features, stride=self.stride, padding=self.padding, dtype=self.dtype,
                name="conv")(h)


class TimeEmbedding(nn.Module):
  """TimestepEmbedding: linear_1, SiLU, linear_2."""
  features: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, t_emb):
    emb = dense(self.features, self.dtype, "linear_1")(t_emb.astype(self.dtype))
    return dense(self.features, self.dtype, "linear_2")(nn.swish(emb))


class FourierProjection(nn.Module):
  """GaussianFourierProjection as UNet2DModel builds it: sin, cos of 2 pi log(t) W."""
  size: int

  @nn.compact
  def __call__(self, time):
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.normal(16.0),
                                                               ("embed_out",)), (self.size,))
    angles = jnp.log(time)[:, None] * weight.astype(jnp.float32)[None] * 2 * math.pi
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class DiffusersUNet(nn.Module):
  """UNet2DModel: (z NHWC, diffusers timestep (B,), class label) -> output NHWC."""
  spec: Spec
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z, time, label: Optional[jnp.ndarray] = None, train: bool = False,
               capture_features: bool = False, steps: Optional[jnp.ndarray] = None):
    spec, dtype = self.spec, self.dtype
    channels, levels = spec.block_out_channels, len(spec.block_out_channels)
    time = jnp.broadcast_to(time, z.shape[:1]).astype(jnp.float32)
    if spec.center_input_sample:
      z = 2 * z - 1.0
    if spec.time_embedding_type == "fourier":
      t_emb = FourierProjection(channels[0], name="time_proj")(time)
    else:
      t_emb = timestep_embedding(time, channels[0], spec.flip_sin_to_cos, spec.freq_shift)
    emb_dim = spec.time_embedding_dim or 4 * channels[0]
    emb = TimeEmbedding(emb_dim, dtype, name="time_embedding")(t_emb)
    if spec.num_class_embeds:
      if label is None:
        raise ValueError("this diffusers UNet2DModel is class-conditional (num_class_embeds="
                         f"{spec.num_class_embeds}): give it labels")
      emb = emb + nn.Embed(spec.num_class_embeds, emb_dim, dtype=dtype, param_dtype=dtype,
                           embedding_init=nn.with_logical_partitioning(
                               nn.initializers.normal(1.0), ("classes", "embed_out")),
                           name="class_embedding")(label)
    emb = add_step_embedding(emb, steps, dtype)

    h = Conv(channels[0], dtype=dtype, name="conv_in")(z)
    skips = [h]
    for i, kind in enumerate(spec.down_block_types):
      h, outputs = DownBlock(spec, channels[i], kind == "AttnDownBlock2D", i < levels - 1, dtype,
                             name=f"down_blocks_{i}")(h, emb, train)
      skips += outputs
      if capture_features:
        self.sow("intermediates", f"down_{i}", h)
    if spec.mid_block:
      h = MidBlock(spec, dtype, name="mid_block")(h, emb, train)
    if capture_features:
      self.sow("intermediates", "bottleneck", h)
    for i, kind in enumerate(spec.up_block_types):
      h = UpBlock(spec, channels[-1 - i], kind == "AttnUpBlock2D", i < levels - 1, dtype,
                  name=f"up_blocks_{i}")(h, skips, emb, train)
      if capture_features:
        self.sow("intermediates", f"up_{levels - 1 - i}", h)
    h = nn.swish(norm(spec.norm_num_groups, spec.norm_eps, dtype, "conv_norm_out")(h))
    out = Conv(spec.out_channels, dtype=dtype, name="conv_out")(h).astype(jnp.float32)
    if spec.time_embedding_type == "fourier":
      out = out / time[:, None, None, None]
    return out


def check_field(config: dict, field: str, ok: bool, why: str):
  if not ok:
    raise ConfigError(f"diffusers config.json: {field}={config.get(field)!r} is not supported "
                      f"({why})")


def from_config(config: dict, dtype=jnp.float32) -> DiffusersUNet:
  """The module of a UNet2DModel config.json; an unsupported field is a ConfigError naming it."""
  get = lambda field, default=None: config.get(field, default)
  check_field(config, "_class_name", get("_class_name", "UNet2DModel") == "UNet2DModel",
              "only UNet2DModel converts")
  for field, choices in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
    kinds = tuple(get(field, ()))
    check_field(config, field, bool(kinds) and all(k in choices for k in kinds),
                f"blocks of {choices}")
  channels = tuple(get("block_out_channels", (224, 448, 672, 896)))
  check_field(config, "block_out_channels",
              len(channels) == len(get("down_block_types")) == len(get("up_block_types")),
              "one per down block and per up block")
  check_field(config, "time_embedding_type", get("time_embedding_type", "positional")
              in TIME_EMBEDDINGS, f"choose one of {TIME_EMBEDDINGS}")
  check_field(config, "mid_block_type", get("mid_block_type", "UNetMidBlock2D")
              in ("UNetMidBlock2D", None), "UNetMidBlock2D or none")
  for field in ("downsample_type", "upsample_type"):
    check_field(config, field, get(field, "conv") == "conv", "only 'conv'")
  check_field(config, "act_fn", get("act_fn", "silu") in ("silu", "swish"), "only SiLU")
  check_field(config, "resnet_time_scale_shift", get("resnet_time_scale_shift", "default")
              in ("default", "scale_shift"), "'default' or 'scale_shift'")
  check_field(config, "class_embed_type", get("class_embed_type") is None,
              "only the num_class_embeds table")
  check_field(config, "norm_num_groups", get("norm_num_groups", 32) is not None,
              "GroupNorm needs a group count")
  return DiffusersUNet(Spec(
      out_channels=get("out_channels", 3), block_out_channels=channels,
      down_block_types=tuple(get("down_block_types")), up_block_types=tuple(get("up_block_types")),
      layers_per_block=get("layers_per_block", 2),
      mid_block=get("mid_block_type", "UNetMidBlock2D") is not None,
      add_attention=get("add_attention", True), attention_head_dim=get("attention_head_dim", 8),
      norm_num_groups=get("norm_num_groups", 32), attn_norm_num_groups=get("attn_norm_num_groups"),
      norm_eps=get("norm_eps", 1e-5), time_embedding_type=get("time_embedding_type", "positional"),
      time_embedding_dim=get("time_embedding_dim"), flip_sin_to_cos=get("flip_sin_to_cos", True),
      freq_shift=get("freq_shift", 0), downsample_padding=get("downsample_padding", 1),
      mid_block_scale_factor=get("mid_block_scale_factor", 1.0),
      resnet_time_scale_shift=get("resnet_time_scale_shift", "default"),
      center_input_sample=get("center_input_sample", False),
      num_class_embeds=get("num_class_embeds") or 0, dropout=get("dropout", 0.0)), dtype=dtype)
