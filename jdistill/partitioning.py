"""Mesh, logical-axis rules and shardings: data parallel, FSDP and one device are the same code.

Params carry logical axis names (`nn.with_logical_partitioning`); `RULES` maps them to the mesh
axes ('data', 'fsdp'). A dimension that the mesh axis does not divide stays replicated.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_SPEC = P(MESH_AXES)          # batches are split over every device
RULES = {
    "channels_out": "fsdp", "embed_out": "fsdp", "head_dim": "fsdp",
    "channels_in": None, "embed_in": None, "conv_height": None, "conv_width": None,
    "heads": None, "norm": None, "classes": None,
}


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  if len(devices) % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
  return jax.make_mesh((len(devices) // fsdp, fsdp), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_spec(names, shape, mesh: Mesh) -> P:
  """Logical names -> PartitionSpec on `mesh`, replicating dims the mesh axis does not divide."""
  used, spec = set(), []
  for name, size in zip(names, shape):
    axis = RULES.get(name)
    if axis is None or axis in used or mesh.shape[axis] == 1 or size % mesh.shape[axis]:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def shardings_for(boxed_tree, mesh: Mesh):
  """NamedShardings for the *unboxed* version of a (possibly abstract) tree with nn.Partitioned
  leaves; plain leaves (steps, optimizer counts, RNG) are replicated."""
  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, mesh_spec(leaf.names, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated(mesh: Mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh):
  return NamedSharding(mesh, BATCH_SPEC)


def with_values(boxed_params, values):
  """The boxed tree `boxed_params` with its arrays replaced by `values` (an unboxed tree)."""
  return jax.tree.map(lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned)
                      else value, boxed_params, values,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def local_mesh(fsdp: int = 1) -> Mesh:
  """This process's devices only (a cache build is process-local: each process writes its own
  shards); `fsdp` falls back to 1 where it does not divide them."""
  return make_mesh(fsdp if jax.local_device_count() % fsdp == 0 else 1, jax.local_devices())
