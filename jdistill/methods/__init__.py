"""The method registry: each method is a driver module here (its config section and defaults,
`validate`, `make_objective`, `train`, and what sampling needs: EXPORT, PARAMS_KEY, sampling_mode)
over its math in jdistill/objectives/. `train(config, workdir)` validates, then runs the method."""
from __future__ import annotations

import jax

from jdistill import config as config_lib
from jdistill import lock, resume
from jdistill.errors import ConfigError
from jdistill.train import teachers
from jdistill.methods import (common, consistency, distribution_matching, guided, meanflow,
                              multi_teacher, progressive, reflow, teacher)

METHODS = {
    "teacher": teacher,
    "progressive": progressive,
    "dmd": distribution_matching,
    "multi_teacher": multi_teacher,
    "reflow": reflow,
    "meanflow": meanflow,
    "consistency": consistency,
    "guided": guided,
}


def get(name: str):
  """The driver module of method `name` (config.method)."""
  if name not in METHODS:
    raise ConfigError(f"config.method: unknown method {name!r}; choose one of {sorted(METHODS)}")
  return METHODS[name]


def validate(config, num_devices: int):
  """Every check, before any compute: the shared sections, the optional training controls (one
  the method does not support is refused, naming the field and the methods that support it), and
  the method's own section."""
  method = get(config.method)
  config_lib.validate(config, num_devices)
  for control, field in common.controls_in_use(config).items():
    if control not in method.CONTROLS:
      supporters = sorted(name for name, m in METHODS.items() if control in m.CONTROLS)
      raise ConfigError(f"config.{field}: method {config.method!r} does not support {control}; "
                        f"methods that do: {', '.join(supporters)}")
  method.validate(config)


def train(config, workdir: str, allow_config_changes=()):
  """Validates `config`, takes `workdir`'s lock (one writer per run), checks that a resumed run
  keeps its config (but for fields that may change and the `allow_config_changes` names), then
  trains the method into `workdir`; returns what the method returns (the final params). A
  converted diffusers teacher's model and diffusion sections come first (adopt_converted_teacher)."""
  config = teachers.adopt_converted_teacher(config)
  validate(config, jax.device_count())
  with lock.hold(workdir):
    resume.check_config(config, workdir, allow_config_changes,
                        defaults=get(config.method).get_config(config.preset))
    return get(config.method).train(config, workdir)
