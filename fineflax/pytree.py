"""Naming the leaves of parameter trees: what freeze plans, optimizer masks, checkpoint
comparisons and exports all need, below every layer that uses it."""

from __future__ import annotations

from typing import Any, Sequence


def path_str(path: Sequence[Any]) -> str:
  """'backbone/conv1_conv/kernel' for a `jax.tree_util` key path (dict keys, attribute
  names and sequence indices alike)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)
