"""`--config.KEY=VALUE` flags looked at before absl and ml_collections parse them: unknown
keys are refused with the nearest known one; `=None` sets None; and a key that may be
None takes a value whatever the config file set it to.

ml_collections types an override by the value the config file left in the key: a key
left at None (`config.data.test_split = None`) cannot be overridden at all ("Type
NoneType ... is not supported for overriding"), and `=None` sets the string 'None'.
Those flags are taken out of the command line here (`split_overrides`) and applied to the
loaded config (`apply_overrides`), typed by the key's schema Field.
"""

from __future__ import annotations

import ast
import re
from typing import Any, Sequence

import ml_collections

from fineflax.config.fields import Field, suggest
from fineflax.config.phase_schema import PHASE_SCHEMA
from fineflax.config.schema import SCHEMA
from fineflax.errors import ConfigError

_OVERRIDE = re.compile(r'^--config\.([^=]+?)(=.*)?$')
_PHASE_KEY = re.compile(r'^phases\[(\d+)\]\.([\w.]+)$')
_PATH_PART = re.compile(r'^(\w+)(?:\[(\d+)\])?$')


def _field(key: str, arg: str) -> Field | dict:
  """The schema entry of `key` ('data.test_split', 'phases[1].clip_norm'); a ConfigError
  naming `arg` and the nearest known key when there is none."""
  phase_key = _PHASE_KEY.match(key)
  node: Any = SCHEMA
  prefix, parts = 'config', key.split('.')
  if phase_key:
    node, parts = PHASE_SCHEMA, phase_key.group(2).split('.')
    prefix = f'config.phases[{phase_key.group(1)}]'
  for i, part in enumerate(parts):
    if not isinstance(node, dict) or part not in node:
      known = node if isinstance(node, dict) else {}
      where = '.'.join([prefix] + parts[: i + 1])
      raise ConfigError(f'{arg}: unknown config key {where}{suggest(part, known)}')
    node = node[part]
  return node


def check_override_flags(argv: Sequence[str]) -> None:
  """Rejects `--config.KEY=...` flags whose KEY is unknown, before absl parses them.

  (ml_collections would otherwise fail deep inside flag parsing with a bare KeyError.)
  """
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      _field(match.group(1), arg)


def _parse(arg: str, field: Field, text: str) -> Any:
  """The value of `text` for a key of `field`'s types, or a ConfigError naming `arg`."""
  if text == 'None':
    return None
  kinds = field.types
  try:
    if bool in kinds:
      if text.lower() not in ('true', 'false'):
        raise ValueError(text)
      return text.lower() == 'true'
    if kinds[0] is int:
      return int(text) if str not in kinds or text.lstrip('-').isdigit() else text
    if float in kinds:
      return float(text)
    if tuple in kinds:
      value = ast.literal_eval(text) if str not in kinds or text[:1] in '([' else text
      return tuple(value) if isinstance(value, (tuple, list)) else value
    return text
  except (ValueError, SyntaxError):
    names = ' or '.join(t.__name__ for t in kinds)
    raise ConfigError(f'{arg}: expected {names}') from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, Any]]]:
  """`argv` without the `--config.KEY=VALUE` flags this module applies itself (`=None`,
  and any value of a key that may be None), and those (KEY, value) pairs, typed."""
  rest, pairs = [], []
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if not match or not match.group(2):
      rest.append(arg)
      continue
    key, text = match.group(1), match.group(2)[1:]
    field = _field(key, arg)
    if isinstance(field, Field) and (text == 'None' or field.optional or field.default is None):
      pairs.append((key, _parse(arg, field, text)))
    else:
      rest.append(arg)
  return rest, pairs


def apply_overrides(config: ml_collections.ConfigDict, pairs: Sequence[tuple[str, Any]]) -> None:
  """Sets each (KEY, value) of `split_overrides` in the loaded `config`; `validate` then
  checks the values (and refuses None where a key does not accept it)."""
  for key, value in pairs:
    node: Any = config
    parts = key.split('.')
    for i, part in enumerate(parts):
      name, index = _PATH_PART.match(part).groups()
      if index is not None:
        if int(index) >= len(node[name]):
          raise ConfigError(
              f'--config.{key}: the config has no such phase (phases are ' 'numbered from 0)'
          )
        node = node[name][int(index)]
      elif i == len(parts) - 1:
        with node.ignore_type():  # a str key may take a tuple (class_weight), None a str
          node[name] = value
      else:
        node = node[name]
