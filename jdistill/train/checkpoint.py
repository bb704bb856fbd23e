"""Orbax checkpoints: the train state (StandardSave) + JSON metadata (step, stage, data iterator
state, config). Async and atomic; restored onto any mesh by passing target shardings."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
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


def restore(mngr, abstract_state):
  """(state, meta) of the newest step that restores, placed by `abstract_state`'s shardings. A
  newer step that does not restore (cut short or corrupted on disk) is moved aside to
  `<step>.corrupt`, with a warning, so the run resumes from the step before it."""
  args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
  restored = newest_intact(mngr, lambda step: mngr.restore(step, args=args), move_aside=True)
  return restored["state"], restored["meta"]


def newest_intact(mngr, restore_step, move_aside: bool = False):
  """restore_step(step) for the newest step of `mngr` that restores. Newer steps that fail are
  logged and, with `move_aside`, renamed `<step>.corrupt` (Orbax then ignores them). If no step
  restores, the error names each step and why."""
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise CheckpointError(f"no checkpoint in {mngr.directory}")
  errors = []
  for step in steps:
    try:
      restored = restore_step(step)
    except Exception as e:  # noqa: BLE001 - any failure to read a step is reported with it
      errors.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
      continue
    for line in errors:
      logging.warning("%s: %s; using step %d", mngr.directory, line, step)
    if errors and move_aside:
      if jax.process_index() == 0:
        for bad in steps[:len(errors)]:
          path = epath.Path(mngr.directory) / str(bad)
          path.rename(path.parent / f"{bad}.corrupt")
      multihost_utils.sync_global_devices("jdistill: corrupt checkpoint steps moved aside")
      mngr.reload()
    return restored
  raise CheckpointError(
      f"no checkpoint in {mngr.directory} restores onto this run's state (a different model or "
      f"method config, or every step is damaged):\n  " + "\n  ".join(errors))


def read_meta(directory: str, step: Optional[int] = None) -> dict:
  """The JSON metadata of a checkpoint, without restoring arrays."""
  mngr = manager(directory, asynchronous=False)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(directory: str, abstract_params: Any, key: str = "ema_params",
                   step: Optional[int] = None, card: Optional[Callable] = None):
  """Restores only `state[key]` (e.g. a teacher's EMA params) from a checkpoint directory (its
  newest intact step by default) and places it like `abstract_params` (ShapeDtypeStructs with
  shardings). Says which and why on a mismatch. `card(model_card, what)` checks what the
  checkpoint's metadata says the model is."""
  if not epath.Path(directory).is_dir():
    raise CheckpointError(f"checkpoint directory {directory!r} does not exist")
  mngr = manager(directory, asynchronous=False)
  # A checkpoint saved on another topology (a 2-process run, a GPU/TPU pod) has shardings naming
  # devices this process may not have: restore those arrays replicated, then `place_like` reshards.
  args = ocp.args.Composite(state=ocp.args.StandardRestore(
      fallback_sharding=_replicated_like(abstract_params)), meta=ocp.args.JsonRestore())
  restore_step = lambda s: dict(mngr.restore(s, args=args), step=s)
  restored = restore_step(step) if step is not None else newest_intact(mngr, restore_step)
  state, step = restored["state"], restored["step"]
  if card is not None:
    card(restored["meta"].get("model_card"), f"checkpoint {directory}/{step}")
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
  non_finite = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(abstract_params)):
    if tuple(a.shape) != tuple(b.shape):
      raise CheckpointError(f"{what}: param {jax.tree_util.keystr(path)} has shape {a.shape}, "
                            f"the configured model expects {b.shape}")
    if not np.isfinite(np.asarray(a)).all():
      non_finite.append(jax.tree_util.keystr(path))
  if non_finite:
    raise CheckpointError(f"{what}: {len(non_finite)} params hold NaN/Inf ({', '.join(non_finite[:3])}"
                          f"{', ...' if len(non_finite) > 3 else ''}): the model it was saved from "
                          "had diverged; use an earlier checkpoint of it")
  return jax.tree.map(lambda a, b: jax.device_put(jax.numpy.asarray(a, b.dtype), b.sharding),
                      params, abstract_params)
