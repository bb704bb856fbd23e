"""The ground floor's one error type for configs, and the one check of a field's allowed values:
config validation and the code that uses a field both call `check_choice`, so the message is the
same wherever a bad value is caught."""
from __future__ import annotations


class ConfigError(ValueError):
  """An invalid config field (raised before any compute)."""


def check_choice(field: str, value, choices):
  """Raises ConfigError naming `config.<field>` unless `value` is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"config.{field}: unknown {value!r}; choose one of {tuple(choices)}")
