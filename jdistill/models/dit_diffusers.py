"""A diffusers DiTTransformer2DModel as a jdistill DiT: its module and its params, key by key.

    module = dit_from_diffusers_config(diffusers_config)
    params = dit_params_from_diffusers(state_dict, diffusers_config)   # numpy arrays in and out

The module takes diffusers' timestep as its time (`time_is_logsnr=False`). Every missing,
unexpected or mis-shaped key is an error naming the key; so is a block whose copy of the time or
label embedder differs from block 0's (the DiT here has one, as DiT checkpoints do).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from jdistill.models.dit import FREQUENCY_CHANNELS, DiT

DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                num_layers=28, dropout=0.0, patch_size=2, activation_fn="gelu-approximate",
                num_embeds_ada_norm=1000, norm_type="ada_norm_zero", attention_bias=True,
                norm_elementwise_affine=False, norm_eps=1e-5)
SUPPORTED = dict(activation_fn="gelu-approximate", norm_type="ada_norm_zero", attention_bias=True,
                 norm_elementwise_affine=False)
SHARED_EMBEDDER = "transformer_blocks.{}.norm1.emb."
same = lambda a: a


def _config(diffusers_config: Mapping) -> dict:
  c = {**DEFAULTS, **{k: v for k, v in dict(diffusers_config).items() if k in DEFAULTS}}
  for key, value in SUPPORTED.items():
    if c[key] != value:
      raise ValueError(f"diffusers DiT config: {key}={c[key]!r} is not supported (only {value!r})")
  if c["out_channels"] is None:
    c["out_channels"] = c["in_channels"]
  return c


def model_fields(diffusers_config: Mapping) -> dict:
  """The jdistill `config.model` fields of the DiT of `diffusers_config` (make_denoiser builds from
  them the module dit_from_diffusers_config builds); one it cannot express is an error naming it."""
  c = _config(diffusers_config)
  if c["norm_eps"] != 1e-5:
    raise ValueError(f"diffusers DiT config: norm_eps={c['norm_eps']!r} is not supported (only 1e-5)")
  if c["out_channels"] != c["in_channels"]:
    raise ValueError(f"diffusers DiT config: out_channels={c['out_channels']} is not supported (a "
                     f"learned variance; only out_channels = in_channels = {c['in_channels']})")
  return dict(name="dit", channels=c["num_attention_heads"] * c["attention_head_dim"],
              num_heads=c["num_attention_heads"], depth=c["num_layers"],
              patch_size=c["patch_size"], num_classes=c["num_embeds_ada_norm"], dropout=c["dropout"])


def dit_from_diffusers_config(diffusers_config: Mapping, dtype="float32") -> DiT:
  """The DiT that `dit_params_from_diffusers(..., diffusers_config)` fills."""
  c = _config(diffusers_config)
  hidden = c["num_attention_heads"] * c["attention_head_dim"]
  return DiT(out_channels=c["out_channels"], hidden=hidden,
             patch_size=c["patch_size"], depth=c["num_layers"], num_heads=c["num_attention_heads"],
             dropout=c["dropout"], num_classes=c["num_embeds_ada_norm"], time_is_logsnr=False,
             norm_eps=c["norm_eps"], dtype=np.dtype(dtype))


def _layout(c) -> dict:
  """{diffusers key: (our param path, diffusers shape, (array -> our array), (ours -> array))}."""
  d, heads = c["num_attention_heads"] * c["attention_head_dim"], c["num_attention_heads"]
  p, channels, out = c["patch_size"], c["in_channels"], c["out_channels"]
  layout = {}

  def linear(key, path, d_in, d_out):
    layout[f"{key}.weight"] = (path + ("kernel",), (d_out, d_in), lambda w: w.T, lambda k: k.T)
    layout[f"{key}.bias"] = (path + ("bias",), (d_out,), same, same)

  def attention(key, path, out):
    if out:         # (heads, head_dim, d), the heads of the input split
      layout[f"{key}.weight"] = (path + ("kernel",), (d, d), lambda w: w.T.reshape(heads, -1, d),
                                 lambda k: k.reshape(d, d).T)
      layout[f"{key}.bias"] = (path + ("bias",), (d,), same, same)
    else:           # (d, heads, head_dim), the heads of the output split
      layout[f"{key}.weight"] = (path + ("kernel",), (d, d), lambda w: w.T.reshape(d, heads, -1),
                                 lambda k: k.reshape(d, d).T)
      layout[f"{key}.bias"] = (path + ("bias",), (d,), lambda b: b.reshape(heads, -1),
                               lambda b: b.reshape(d))

  layout["pos_embed.proj.weight"] = (("pos_embed", "kernel"), (d, channels, p, p),
                                     lambda w: w.transpose(2, 3, 1, 0),
                                     lambda k: k.transpose(3, 2, 0, 1))
  layout["pos_embed.proj.bias"] = (("pos_embed", "bias"), (d,), same, same)
  emb = SHARED_EMBEDDER.format(0)
  linear(emb + "timestep_embedder.linear_1", ("timestep_embedder", "linear_1"), FREQUENCY_CHANNELS, d)
  linear(emb + "timestep_embedder.linear_2", ("timestep_embedder", "linear_2"), d, d)
  layout[emb + "class_embedder.embedding_table.weight"] = (
      ("class_embedder", "embedding"), (c["num_embeds_ada_norm"] + 1, d), same, same)
  for i in range(c["num_layers"]):
    key, path = f"transformer_blocks.{i}", (f"transformer_blocks_{i}",)
    linear(f"{key}.norm1.linear", path + ("norm1_linear",), d, 6 * d)
    for theirs, ours in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "out")):
      attention(f"{key}.attn1.{theirs}", path + ("attn1", ours), out=ours == "out")
    linear(f"{key}.ff.net.0.proj", path + ("ff_in",), d, 4 * d)
    linear(f"{key}.ff.net.2", path + ("ff_out",), 4 * d, d)
  linear("proj_out_1", ("proj_out_1",), d, 2 * d)
  linear("proj_out_2", ("proj_out_2",), d, p * p * out)
  return layout


def dit_params_from_diffusers(state_dict: Mapping, diffusers_config: Mapping) -> dict:
  """`state_dict` (diffusers key -> numpy array) as the params of dit_from_diffusers_config."""
  c = _config(diffusers_config)
  layout = _layout(c)
  first = SHARED_EMBEDDER.format(0)
  copies = {key.replace(first, SHARED_EMBEDDER.format(i), 1): key     # block i's copy: block 0's
            for key in layout if key.startswith(first) for i in range(1, c["num_layers"])}
  shapes = {**{key: shape for key, (_, shape, *_) in layout.items()},
            **{copy: layout[original][1] for copy, original in copies.items()}}
  problems = [f"missing key {key!r}" for key in shapes if key not in state_dict]
  problems += [f"unexpected key {key!r}" for key in state_dict if key not in shapes]
  problems += [f"key {key!r} has shape {tuple(np.shape(value))}, expected {shapes[key]}"
               for key, value in state_dict.items()
               if key in shapes and tuple(np.shape(value)) != shapes[key]]
  problems += [f"key {copy!r} differs from {original!r}: this DiT shares one time and label "
               "embedder across its blocks" for copy, original in copies.items()
               if copy in state_dict and original in state_dict
               and np.shape(state_dict[copy]) == np.shape(state_dict[original])
               and not np.array_equal(state_dict[copy], state_dict[original])]
  if problems:
    raise ValueError("diffusers DiT state dict: " + "; ".join(problems))
  params = {}
  for key, (path, _, convert, _) in layout.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(convert(np.asarray(state_dict[key], np.float32)))
  return params


def diffusers_config(model_config, data_shape) -> dict:
  """The DiTTransformer2DModel config.json of jdistill's DiT `model_config` on data of `data_shape`
  (H, W, C). diffusers' DiT always takes a label: an unconditional DiT gets one class whose
  embedding (and the null class's) is zero."""
  height, width, channels = data_shape
  if height != width:
    raise ValueError(f"data shape {tuple(data_shape)}: DiTTransformer2DModel needs square images")
  return {"_class_name": "DiTTransformer2DModel", "sample_size": height, "in_channels": channels,
          "out_channels": channels, "num_layers": model_config.depth,
          "num_attention_heads": model_config.num_heads,
          "attention_head_dim": model_config.channels // model_config.num_heads,
          "patch_size": model_config.patch_size, "dropout": float(model_config.dropout),
          "num_embeds_ada_norm": model_config.num_classes or 1, "norm_num_groups": 32,
          "upcast_attention": False, **SUPPORTED, "norm_eps": 1e-5}


def diffusers_state_dict(params, diffusers_config: Mapping, emb_shift) -> dict:
  """The inverse of dit_params_from_diffusers: {diffusers key: float32 numpy array}, the shared
  time and label embedder copied into every block, `emb_shift` (what a step-count or guidance
  embedding adds to c at the export's setting) added to the time MLP's output bias."""
  c = _config(diffusers_config)
  params = dict(params)
  if "class_embedder" not in params:           # unconditional: a zero table, any label is nothing
    params["class_embedder"] = {"embedding": np.zeros((2, c["num_attention_heads"] *
                                                       c["attention_head_dim"]), np.float32)}
  state = {}
  for key, (path, _, _, to_theirs) in _layout(c).items():
    node = params
    for name in path:
      node = node[name]
    array = np.asarray(node, np.float32)
    if path == ("timestep_embedder", "linear_2", "bias"):
      array = array + np.asarray(emb_shift, np.float32)
    state[key] = np.ascontiguousarray(to_theirs(array))
  first = SHARED_EMBEDDER.format(0)
  for key in [k for k in state if k.startswith(first)]:
    for i in range(1, c["num_layers"]):
      state[key.replace(first, SHARED_EMBEDDER.format(i), 1)] = state[key]
  return state


def module_mapper(diffusers_config: Mapping):
  """names (a param's path) -> the diffusers modules holding it: one, or each block's copy of the
  shared time and label embedder; [] where diffusers has no place for it."""
  c = _config(diffusers_config)
  first = SHARED_EMBEDDER.format(0)
  modules = {}
  for key, (path, *_) in _layout(c).items():
    module = key.rsplit(".", 1)[0]
    copies = [module.replace(first, SHARED_EMBEDDER.format(i), 1) for i in range(c["num_layers"])]
    modules[tuple(path)] = copies if module.startswith(first) else [module]
  return lambda names: modules.get(tuple(names), [])
