"""LoRA students: low-rank adapters on chosen Dense/Conv kernels, applied functionally.

For a kernel W of shape (..., d_in, d_out) the adapted kernel is
    W' = W + (alpha / r) * reshape(A @ B),   A: (prod(...) * d_in, r) ~ N(0, 1/fan_in),  B: (r, d_out) = 0,
so a fresh adapter leaves the model unchanged. Only the adapters are trained (the optimizer sees
only them); `merge` folds them into full weights for sampling and export. Works with any Flax
module, no change to its code: adapters live in their own tree keyed by the kernel's path.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def path_name(path):
  return "/".join(str(getattr(k, "key", k)) for k in path)


@dataclasses.dataclass(frozen=True)
class LoRA:
  rank: int = 4
  alpha: float = 4.0
  targets: Sequence[str] = (r".*",)       # regexes over kernel paths like 'ResBlock_3/Conv_0/kernel'

  @property
  def scale(self):
    return self.alpha / self.rank

  def targeted(self, params):
    """Paths of the kernels (ndim >= 2, named 'kernel') that get an adapter."""
    paths = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      name = path_name(path)
      if name.endswith("kernel") and leaf.ndim >= 2 and any(re.fullmatch(t, name) for t in self.targets):
        paths.append(name)
    if not paths:
      raise ValueError(f"config.lora.targets={list(self.targets)} match no Dense/Conv kernel")
    return paths

  def init(self, rng, params):
    """{path: {'a': (fan_in, r), 'b': (r, d_out)}} for every targeted kernel."""
    leaves = {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    adapters = {}
    for i, name in enumerate(self.targeted(params)):
      kernel = leaves[name]
      fan_in = math.prod(kernel.shape[:-1])
      a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, self.rank)) / math.sqrt(fan_in)
      adapters[name] = {"a": a, "b": jnp.zeros((self.rank, kernel.shape[-1]))}
    return adapters

  def merge(self, params, adapters):
    """Full weights: W + (alpha / r) reshape(A B) on every adapted kernel; others unchanged."""
    def one(path, leaf):
      adapter = adapters.get(path_name(path))
      if adapter is None:
        return leaf
      delta = (adapter["a"] @ adapter["b"]).reshape(leaf.shape)
      return leaf + self.scale * delta.astype(leaf.dtype)
    return jax.tree_util.tree_map_with_path(one, params)


def make_lora(config):
  """None unless `config.lora.rank > 0`."""
  c = config.get("lora")
  if c is None or c.rank <= 0:
    return None
  return LoRA(rank=c.rank, alpha=c.alpha, targets=tuple(c.targets))


def peft_factors(a, b, kernel_shape, out_projection: bool):
  """(lora_A, lora_B) in PEFT's torch layout of jdistill's adapter W' = W + s reshape(A B) on a
  kernel of `kernel_shape`: conv HWIO -> lora_A (r, in, kh, kw), lora_B (out, r, 1, 1); dense
  (in, out) and an attention output (heads, head_dim, out) -> (r, in), (out, r). An attention
  input projection (in, heads, head_dim) adapts each head's (in, head_dim) block apart: rank
  heads r, lora_B block-diagonal."""
  r = a.shape[-1]
  if len(kernel_shape) == 4:
    kh, kw, cin, _ = kernel_shape
    return a.reshape(kh, kw, cin, r).transpose(3, 2, 0, 1), b.T[:, :, None, None]
  if len(kernel_shape) == 3 and not out_projection:
    cin, heads, head_dim = kernel_shape
    lora_a = a.reshape(cin, heads, r).transpose(1, 2, 0).reshape(heads * r, cin)
    lora_b = np.zeros((heads, head_dim, heads, r), np.float32)
    for h in range(heads):
      lora_b[h, :, h, :] = b.T
    return lora_a, lora_b.reshape(heads * head_dim, heads * r)
  return a.T, b.T
