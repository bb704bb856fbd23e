"""jdistill's own U-Net (models/unet.py) as a diffusers UNet2DModel: its config and its weights.

    config = diffusers_config(model_config, data_shape, out_channels, num_train_timesteps)
    state = diffusers_state_dict(params, model_config, image_size, time_table, emb_shift)

The blocks are diffusers' own: ResnetBlock2D (GroupNorm eps 1e-6), AttnDown/AttnUpBlock2D where
the U-Net attends, a stride-2 convolution padded after (TF 'SAME': `downsample_padding=0`),
nearest upsampling plus a convolution, UNetMidBlock2D. The time embedding is diffusers' 'learned'
one: a table whose row k is the U-Net's sinusoidal embedding of the logSNR that the exported
scheduler gives timestep k (`time_table`), so the network sees exactly what it saw here. A class
label's table keeps its null class (num_class_embeds = num_classes + 1). `emb_shift` is added to
the time MLP's output bias: what the zero-initialised embeddings a method adds (a step count, a
guidance weight) contribute at the one setting the export samples with.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import jax
import numpy as np
from flax import linen as nn


def attention_levels(model_config, image_size: int):
  """Whether each level of the U-Net attends (its resolution is in attention_resolutions)."""
  return [image_size // 2**level in tuple(model_config.attention_resolutions)
          for level in range(len(model_config.channel_mult))]


def diffusers_config(model_config, data_shape, out_channels: int, num_train_timesteps: int) -> dict:
  """The UNet2DModel config.json of the U-Net `model_config` on data of `data_shape` (H, W, C)."""
  height, width, channels = data_shape
  if height != width:
    raise ValueError(f"data shape {tuple(data_shape)}: UNet2DModel export needs square images")
  widths = [model_config.channels * m for m in model_config.channel_mult]
  attends = attention_levels(model_config, height)
  heads = model_config.num_heads
  attending = {w for w, a in zip(widths, attends) if a} | {widths[-1]}      # + the middle block
  head_dims = {w // heads for w in attending}
  if heads > 1 and (len(head_dims) > 1 or any(w % heads for w in attending)):
    raise ValueError(f"model.num_heads={heads}: diffusers gives every attention layer one head "
                     f"width (attention_head_dim), but these layers have {sorted(attending)} "
                     "channels")
  return {
      "_class_name": "UNet2DModel", "sample_size": height, "in_channels": channels,
      "out_channels": out_channels, "center_input_sample": False,
      "time_embedding_type": "learned", "num_train_timesteps": num_train_timesteps,
      "freq_shift": 0, "flip_sin_to_cos": False,
      "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
      "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
      "block_out_channels": widths, "layers_per_block": model_config.num_res_blocks,
      "mid_block_scale_factor": 1, "downsample_padding": 0, "downsample_type": "conv",
      "upsample_type": "conv", "dropout": float(model_config.dropout), "act_fn": "silu",
      "attention_head_dim": head_dims.pop() if heads > 1 else None,
      "norm_num_groups": model_config.norm_groups, "attn_norm_num_groups": None, "norm_eps": 1e-6,
      "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
      "num_class_embeds": model_config.num_classes + 1 if model_config.num_classes else None,
  }


def module_names(model_config, image_size: int) -> Iterator[Tuple[str, str]]:
  """(the U-Net's module path, its diffusers prefix), in the order the U-Net creates them (Flax
  names unnamed submodules ResBlock_0, ResBlock_1, ... by that order)."""
  levels, blocks = len(model_config.channel_mult), model_config.num_res_blocks
  attends = attention_levels(model_config, image_size)
  count = {"ResBlock": 0, "AttentionBlock": 0, "Conv": 0}

  def next_name(kind):
    count[kind] += 1
    return f"{kind}_{count[kind] - 1}"
  yield "Dense_0", "time_embedding.linear_1"
  yield "Dense_1", "time_embedding.linear_2"
  yield "Embed_0", "class_embedding"
  yield next_name("Conv"), "conv_in"
  for level in range(levels):
    for j in range(blocks):
      yield next_name("ResBlock"), f"down_blocks.{level}.resnets.{j}"
      if attends[level]:
        yield next_name("AttentionBlock"), f"down_blocks.{level}.attentions.{j}"
    if level != levels - 1:
      yield next_name("Conv"), f"down_blocks.{level}.downsamplers.0.conv"
  yield next_name("ResBlock"), "mid_block.resnets.0"
  yield next_name("AttentionBlock"), "mid_block.attentions.0"
  yield next_name("ResBlock"), "mid_block.resnets.1"
  for up, level in enumerate(reversed(range(levels))):
    for j in range(blocks + 1):
      yield next_name("ResBlock"), f"up_blocks.{up}.resnets.{j}"
      if attends[level]:
        yield next_name("AttentionBlock"), f"up_blocks.{up}.attentions.{j}"
    if level != 0:
      yield next_name("Conv"), f"up_blocks.{up}.upsamplers.0.conv"
  yield "GroupNorm_0", "conv_norm_out"
  yield next_name("Conv"), "conv_out"


RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj",
          "GroupNorm_1": "norm2", "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
ATTENTION = {"GroupNorm_0": "group_norm", "MultiHeadDotProductAttention_0/query": "to_q",
             "MultiHeadDotProductAttention_0/key": "to_k",
             "MultiHeadDotProductAttention_0/value": "to_v",
             "MultiHeadDotProductAttention_0/out": "to_out.0"}
LEAVES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def module_mapper(model_config, image_size: int):
  """names (a param's path) -> the diffusers module holding it ('down_blocks.0.resnets.1.conv1'),
  or None where diffusers has no place for it."""
  prefixes = dict(module_names(model_config, image_size))

  def module_of(names):
    module = names[0]
    if module not in prefixes or (module == "Embed_0" and not model_config.num_classes):
      return None
    kind = module.rsplit("_", 1)[0]
    table = RESNET if kind == "ResBlock" else ATTENTION if kind == "AttentionBlock" else None
    if table is None:
      return prefixes[module]
    sub = "/".join(names[1:-1])
    return f"{prefixes[module]}.{table[sub]}" if sub in table else None
  return module_of


def diffusers_state_dict(params, model_config, image_size: int, time_table: np.ndarray,
                         emb_shift: np.ndarray) -> dict:
  """{diffusers key: float32 numpy array} of the U-Net's params (without the embeddings folded into
  `emb_shift`). Params that diffusers has no place for are an error naming them."""
  module_of = module_mapper(model_config, image_size)
  state = {"time_proj.weight": np.asarray(time_table, np.float32)}
  unplaced = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(params)):
    names = [p.key for p in path]
    prefix, leaf_name = module_of(names), names[-1]
    if prefix is None:
      unplaced.append("/".join(names))
      continue
    array = np.asarray(leaf, np.float32)
    projection = "MultiHeadDotProductAttention_0" in names
    if projection and leaf_name == "kernel":     # query/key/value (C, h, d); out (h, d, C)
      array = array.reshape(array.shape[0], -1).T if names[-2] != "out" else \
          array.reshape(-1, array.shape[-1]).T
    elif projection:
      array = array.reshape(-1)
    elif leaf_name == "kernel":
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    if names[0] == "Dense_1" and leaf_name == "bias":
      array = array + np.asarray(emb_shift, np.float32)
    state[f"{prefix}.{LEAVES[leaf_name]}"] = np.ascontiguousarray(array)
  if unplaced:
    raise ValueError(f"U-Net params with no UNet2DModel place: {unplaced}")
  return state
