"""Validation of a user's config against the schema before anything runs: each unknown
key (with the nearest known one), wrong type or bad value is a ConfigError naming the
key. Also the config as plain JSON values (DIR/config.json) and back."""

from __future__ import annotations

from typing import Any

import ml_collections

from fineflax.config import registry
from fineflax.config.fields import Field, suggest
from fineflax.config.phase_schema import PHASE_SCHEMA, phase
from fineflax.config.schema import SCHEMA, default_config
from fineflax.config.smoke import with_values
from fineflax.errors import ConfigError


def _check_value(path: str, field: Field, value: Any) -> None:
  if value is None:
    if field.optional:
      return
    raise ConfigError(f'{path}: None is not allowed ({field.help})')
  ok_type = isinstance(value, field.types) and not (
      isinstance(value, bool) and bool not in field.types
  )
  if not ok_type:
    names = ' or '.join(t.__name__ for t in field.types)
    raise ConfigError(f'{path}={value!r}: expected {names}, got {type(value).__name__}')
  if field.check is not None:
    error = field.check(value)
    if error:
      raise ConfigError(f'{path}={value!r}: {error}')


def _check_tree(path: str, schema: dict[str, Any], cfg: Any, extra: tuple[str, ...] = ()) -> None:
  if not isinstance(cfg, (dict, ml_collections.ConfigDict)):
    raise ConfigError(f'{path}: expected a config section, got {cfg!r}')
  for key in cfg.keys():
    if key not in schema and key not in extra:
      raise ConfigError(f'unknown config key {path}.{key}{suggest(key, schema)}')
  for key, field in schema.items():
    value = cfg[key] if key in cfg else (None if isinstance(field, dict) else field.default)
    if isinstance(field, dict):
      _check_tree(f'{path}.{key}', field, value if value is not None else {})
    else:
      _check_value(f'{path}.{key}', field, value)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key and value; returns a complete, resolved copy with phase names set.

  Raises:
    ConfigError: naming the first offending key.
  """
  _check_tree('config', SCHEMA, config, extra=('phases',))
  phases = config.get('phases')
  if not isinstance(phases, (tuple, list)) or not phases:
    raise ConfigError(
        'config.phases: expected a non-empty tuple of phases (fineflax.config.'
        f'phase(...)), got {phases!r}'
    )
  for i, p in enumerate(phases):
    _check_tree(f'config.phases[{i}]', PHASE_SCHEMA, p)
  for check in registry.config_checks():  # keys that depend on each other
    check(config)
  for i, p in enumerate(phases):
    if p.get('augment') is False and config.data.augment.get('crop') is not None:
      raise ConfigError(
          f'config.phases[{i}].augment=False with config.data.augment.crop set: '
          'a phase without augmentation cannot take random crops; drop the crop '
          'or augment the phase'
      )
  names = [p.get('name') or f'phase{i}' for i, p in enumerate(phases)]
  if len(set(names)) != len(names):
    raise ConfigError(f'config.phases: phase names must be unique, got {names}')

  out = default_config()
  out.update(
      config.copy_and_resolve_references()
      if isinstance(config, ml_collections.ConfigDict)
      else ml_collections.ConfigDict(config)
  )
  out.phases = tuple(with_values(phase(**dict(p)), name=name) for p, name in zip(phases, names))
  out.checkpoint.mode = resolve_mode(out.checkpoint.monitor, out.checkpoint.mode)
  for p in out.phases:
    p.early_stopping.mode = resolve_mode(p.early_stopping.monitor, p.early_stopping.mode)
  return out


def resolve_mode(monitor: str, mode: str) -> str:
  """'min' or 'max' for a monitored metric ('auto': max for accuracies, as Keras', those
  of the moving average too)."""
  if mode != 'auto':
    return mode
  return 'max' if monitor.removesuffix('_ema').endswith('accuracy') else 'min'


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON-able values (what a run saves as DIR/config.json)."""

  def plain(value):
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    return value

  return plain(config)


def from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """The validated config of `to_dict`'s output (a run's DIR/config.json)."""
  values = dict(values)
  phases = tuple(ml_collections.ConfigDict(p) for p in values.pop('phases', ()))
  config = ml_collections.ConfigDict(values)
  config.phases = phases
  return validate(config)
