"""The resume policy: what a resumed run may change in its config and what it may not."""

from __future__ import annotations

import re
from typing import Any

import ml_collections

from fineflax.config.schema import default_config
from fineflax.config.validation import to_dict

# What may change when a run is resumed: how long phases last, what is reported, how
# often it saves, where the data lives and how many processes decode it.
_RESUMABLE_CHANGES = re.compile(
    r'^(report\.|features\.|checkpoint\.(keep|every_steps)$|'
    r'data\.(data_dir|manual_dir|workers|memory_max_mb)$|'
    r'phases\[\d+\]\.epochs$|eval_batch_size$|allow_config_change$)'
)


def _flatten(values: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(values, dict):
    out = {}
    for key, value in values.items():
      out.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
    return out
  if prefix == 'phases':
    out = {}
    for i, p in enumerate(values):
      out.update(_flatten(p, f'phases[{i}]'))
    return out
  return {prefix: values}


def changes_on_resume(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """The keys in which `config` differs from a run's saved config.json that a resume must
  not change silently, as 'key: saved -> now' (phases appended at the end are fine; a key
  the saved config predates counts as saved at its default)."""
  old, new = _flatten(saved), _flatten(to_dict(config))
  defaults = {k: v for k, v in _flatten(to_dict(default_config())).items() if '[' not in k}
  old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
  appended = len(config.phases) > len(saved.get('phases', ()))
  out = []
  for key in sorted(set(old) | set(new)):
    if old.get(key) == new.get(key) or _RESUMABLE_CHANGES.match(key):
      continue
    phase = re.match(r'^phases\[(\d+)\]', key)
    if appended and key not in old and phase and int(phase.group(1)) >= len(saved['phases']):
      continue
    out.append(f'{key}: {old.get(key, "(absent)")!r} -> {new.get(key, "(absent)")!r}')
  return out
