"""Orbax checkpoints: the train state (StandardSave) + JSON metadata (step, stage, data iterator
state, config). Async and atomic; restored onto any mesh by passing target shardings."""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint is missing or does not match what the run expects."""


def manager(directory: str, max_to_keep: Optional[int] = 2, asynchronous: bool = True):
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=asynchronous)
  return ocp.CheckpointManager(absolute(directory), options=options,
                               item_names=("state", "meta"))


def absolute(path: str):
  """An absolute local path, or a remote one (gs://...) untouched."""
  return path if "://" in str(path) else os.path.abspath(path)


def save(mngr, step: int, state, meta: dict, force: bool = False):
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)


def abstract_with_shardings(abstract_state, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def restore(mngr, abstract_state, step: Optional[int] = None):
  """(state, meta) of `step` (default latest), placed by `abstract_state`'s shardings."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {mngr.directory}")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f"checkpoint {mngr.directory}/{step} does not match this run's state "
        f"(different model or method config?): {e}") from e
  return restored["state"], restored["meta"]


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  """The JSON metadata of a checkpoint, without restoring arrays."""
  mngr = manager(directory, asynchronous=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(directory: str, abstract_params: Any, key: str = "ema_params",
                   step: Optional[int] = None):
  """Restores only `state[key]` (e.g. a teacher's EMA params) from a checkpoint directory and places
  it like `abstract_params` (ShapeDtypeStructs with shardings). Says which and why on a mismatch."""
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  mngr = manager(directory, asynchronous=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory!r}")
  # A checkpoint saved on another topology (a 2-process run, a GPU/TPU pod) has shardings naming
  # devices this process may not have: restore those arrays replicated, then `place_like` reshards.
  fallback = _replicated_like(abstract_params)
  state = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(fallback_sharding=fallback)))["state"]
  for part in key.split("/"):             # nested keys like 'generator/ema_params'
    if not isinstance(state, dict) or part not in state:
      raise CheckpointError(f"{directory}/{step}: the state has no '{key}' "
                            f"(has {sorted(state) if isinstance(state, dict) else type(state)})")
    state = state[part]
  return place_like(state, abstract_params, f"{directory}/{step} '{key}'")


def _replicated_like(abstract_params):
  """A replicated sharding on the mesh of `abstract_params` (else this process's first device)."""
  for leaf in jax.tree.leaves(abstract_params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def place_like(params, abstract_params, what: str):
  """Checks `params` against `abstract_params` (structure, shapes) and places it on its shardings."""
  got = jax.tree.structure(params)
  want = jax.tree.structure(abstract_params)
  if got != want:
    raise CheckpointError(f"{what} has a different structure than the configured model "
                          f"(different model config?)")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(abstract_params)):
    if tuple(a.shape) != tuple(b.shape):
      raise CheckpointError(f"{what}: param {jax.tree_util.keystr(path)} has shape {a.shape}, "
                            f"the configured model expects {b.shape}")
  return jax.tree.map(lambda a, b: jax.device_put(jax.numpy.asarray(a, b.dtype), b.sharding),
                      params, abstract_params)
