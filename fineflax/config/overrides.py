"""`--config.KEY=VALUE` flags looked at before absl and ml_collections parse them: unknown
keys refused with the nearest known one, `=None` turned into None."""

from __future__ import annotations

import re
from typing import Any, Sequence

import ml_collections

from fineflax.config.schema import PHASE_SCHEMA, SCHEMA, suggest
from fineflax.errors import ConfigError


_OVERRIDE = re.compile(r'^--config\.([^=]+?)(=.*)?$')
_NONE_OVERRIDE = re.compile(r'^--config\.([^=]+)=None$')
_PATH_PART = re.compile(r'^(\w+)(?:\[(\d+)\])?$')


def split_none_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """`argv` without its `--config.KEY=None` flags, and their KEYs (`set_none` applies
  them): ml_collections would set the string 'None', or refuse a key whose value is None."""
  rest, keys = [], []
  for arg in argv:
    match = _NONE_OVERRIDE.match(arg)
    if match:
      keys.append(match.group(1))
    else:
      rest.append(arg)
  return rest, keys


def set_none(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Sets each of `keys` ('data.test_split', 'phases[1].clip_norm') to None in `config`;
  `validate` then refuses it where the key does not accept None."""
  for key in keys:
    node: Any = config
    parts = key.split('.')
    for i, part in enumerate(parts):
      name, index = _PATH_PART.match(part).groups()
      last = i == len(parts) - 1
      if index is not None:
        node = node[name][int(index)]
        if last:
          raise ConfigError(f'--config.{key}=None: a phase cannot be None')
      elif last:
        node[name] = None
      else:
        node = node[name]
_PHASE_KEY = re.compile(r'^phases\[(\d+)\]\.([\w.]+)$')


def check_override_flags(argv: Sequence[str]) -> None:
  """Rejects `--config.KEY=...` flags whose KEY is unknown, before absl parses them.

  (ml_collections would otherwise fail deep inside flag parsing with a bare KeyError.)
  """
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match:
      continue
    key = match.group(1)
    phase_key = _PHASE_KEY.match(key)
    node: Any = SCHEMA
    prefix, parts = 'config', key.split('.')
    if phase_key:
      node, parts = PHASE_SCHEMA, phase_key.group(2).split('.')
      prefix = f'config.phases[{phase_key.group(1)}]'
    for i, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        known = node if isinstance(node, dict) else {}
        where = '.'.join([prefix] + parts[:i + 1])
        raise ConfigError(f'{arg}: unknown config key {where}{suggest(part, known)}')
      node = node[part]
