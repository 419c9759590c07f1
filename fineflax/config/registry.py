"""Checks of config values that other layers own, registered by them, so that the config
layer imports nothing above it: the backbone names (fineflax.models), data sources and
augmentation choices (fineflax.data), freeze spec syntax (fineflax.train.freeze),
optimizers and their phase keys (fineflax.train.optimizers), weight names
(fineflax.weights). `import fineflax` imports all of them, so any use of the config layer
finds them registered.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

ValueCheck = Callable[[Any], 'str | None']  # an error text, or None when the value is fine
ConfigCheck = Callable[[Any], None]  # raises ConfigError

_VALUE_CHECKS: dict[str, ValueCheck] = {}
_CONFIG_CHECKS: dict[str, ConfigCheck] = {}


def register_check(key: str, check: ValueCheck) -> None:
  """Makes `check(value)` the check of the config key `key` ('model.backbone',
  'phases.freeze')."""
  _VALUE_CHECKS[key] = check


def register_choices(key: str, choices: Callable[[], Sequence[str]] | Sequence[str]) -> None:
  """The values `key` accepts (or a function returning them, read at validation)."""
  def check(value: Any) -> str | None:
    allowed = choices() if callable(choices) else choices
    return None if value in allowed else f'expected one of {sorted(allowed)}'
  register_check(key, check)


def register_config_check(name: str, check: ConfigCheck) -> None:
  """A check of the whole validated-so-far config (keys that depend on each other)."""
  _CONFIG_CHECKS[name] = check


def value_check(key: str) -> ValueCheck:
  """The registered check of `key`, looked up when a value is checked."""
  def check(value: Any) -> str | None:
    if key not in _VALUE_CHECKS:
      raise RuntimeError(f'no check registered for config.{key}: import fineflax first')
    return _VALUE_CHECKS[key](value)
  return check


def config_checks() -> list[ConfigCheck]:
  """The registered whole-config checks, in registration order."""
  return list(_CONFIG_CHECKS.values())
