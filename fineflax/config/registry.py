"""Checks of config values that other layers own, registered by them, so that the config
layer imports nothing above it and each list of choices has one owner: the module that
implements it (backbones, heads, preprocessing and dtypes in fineflax.models; data
sources, pipelines and augmentation in fineflax.data; freeze specs, schedules, update
rules, the BatchNorm mode and cached-feature modes in fineflax.train; progress displays
in fineflax.run; weight names in fineflax.weights). `import fineflax` imports all of
them, so any use of the config layer finds them registered.
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


def choices(options: Callable[[], Sequence[str]] | Sequence[str]) -> ValueCheck:
  """The check of a value that must be one of `options` (or of what a function returns,
  read at validation)."""

  def check(value: Any) -> str | None:
    allowed = options() if callable(options) else options
    return None if value in allowed else f'expected one of {sorted(allowed)}'

  return check


def register_choices(key: str, options: Callable[[], Sequence[str]] | Sequence[str]) -> None:
  """The values `key` accepts, owned by the module that implements them."""
  register_check(key, choices(options))


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
