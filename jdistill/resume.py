"""A run directory belongs to one config: resuming it with another is refused before anything is
written, naming each changed field, unless the field only changes how the run logs, saves,
evaluates or is laid out on devices, or the user accepts the change by name."""
from __future__ import annotations

import json

from etils import epath

from jdistill import files
from jdistill.errors import ConfigError

# Fields a resumed run may change without asking: cadences, evaluation sample counts, the mesh (a
# preempted job may come back on another slice) and throughput knobs. A name ending in "." is a
# whole section.
MAY_CHANGE_ON_RESUME = (
    "train.log_every", "train.eval_every", "train.save_every",
    "eval.num_samples", "eval.final_num_samples", "eval.batch_size", "eval.final_steps",
    "eval.steps_during_training", "progressive.eval_every", "progressive.validation_examples",
    "multi_teacher.evaluate_teachers", "cache.read_threads", "cache.build_batch_size", "mesh.",
)


# Fields a later jdistill removed: {field: (the value that means what the run does now, what
# replaced it)}. A run that stored that value resumes; another value is a change, named.
RETIRED = {"dmd.remat": (False, "train.remat")}


def flatten(tree, prefix: str = "") -> dict:
  """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def changed_fields(stored: dict, config, defaults=None) -> dict:
  """{field: (stored value, new value)} for every field that differs (a missing one is None). A
  field the stored config lacks (added by a later jdistill) is unchanged if it is at its value in
  `defaults`."""
  new, old = _flat(config), flatten(stored)
  default = _flat(defaults) if defaults is not None else {}
  retired = lambda k: k in RETIRED and k not in new and old.get(k) == RETIRED[k][0]
  return {k: (old.get(k), new.get(k) if k not in RETIRED else f"(replaced by {RETIRED[k][1]})")
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and not retired(k)
          and not (k not in old and k in default and new[k] == default[k])}


def _flat(config) -> dict:
  return flatten(json.loads(config.to_json_best_effort()))


def may_change(field: str, allowed=()) -> bool:
  return field in allowed or any(
      field == name or (name.endswith(".") and field.startswith(name))
      for name in MAY_CHANGE_ON_RESUME)


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds trained state: an Orbax step in a `checkpoints/` of it, of a
  subdirectory (a cache's teacher), or of a progressive stage."""
  root = epath.Path(workdir)
  return root.is_dir() and any(
      p.name.isdigit() for pattern in ("checkpoints/*", "*/checkpoints/*", "*/*/checkpoints/*")
      for p in root.glob(pattern))


def check_config(config, workdir: str, allowed=(), defaults=None):
  """Refuses to resume `workdir` with a config that changes a field the run was trained with
  (other than MAY_CHANGE_ON_RESUME and the `allowed` names; a field new since the run is compared
  with its value in `defaults`, the method's defaults). A workdir without checkpoints is a fresh
  run."""
  stored = files.read_json(f"{workdir}/config.json")
  if stored is None or not has_checkpoints(workdir):
    return
  changed = changed_fields(stored, config, defaults)
  unknown = [name for name in allowed if name not in flatten(stored) and name not in changed]
  if unknown:
    raise ConfigError(f"--allow_config_changes: {', '.join(unknown)} is not a config field")
  refused = {k: v for k, v in changed.items() if not may_change(k, allowed)}
  if refused:
    lines = "\n".join(f"  config.{k}: {old!r} in the run, {new!r} now"
                      for k, (old, new) in refused.items())
    raise ConfigError(
        f"{workdir} holds a run trained with another config; resuming would mix the two:\n{lines}\n"
        f"Resume with the run's values, use a new --workdir, or accept the change with "
        f"--allow_config_changes={','.join(refused)}")
