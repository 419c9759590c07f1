"""The config reference as a Markdown table (docs/config_reference.md embeds it)."""

from __future__ import annotations

from typing import Any

from fineflax.config.phase_schema import PHASE_SCHEMA
from fineflax.config.schema import SCHEMA


def reference_table() -> str:
  """The config reference as a Markdown table (docs/config_reference.md embeds it; a test
  compares)."""
  rows = ['| key | type | default | meaning |', '|---|---|---|---|']

  def add(prefix: str, schema: dict[str, Any]) -> None:
    for key, field in schema.items():
      if isinstance(field, dict):
        add(f'{prefix}{key}.', field)
        continue
      kind = field.types[0].__name__ + (' or None' if field.optional else '')
      rows.append(f'| `{prefix}{key}` | {kind} | `{field.default!r}` | {field.help} |')

  add('', SCHEMA)
  add('phases[i].', PHASE_SCHEMA)
  return '\n'.join(rows)
