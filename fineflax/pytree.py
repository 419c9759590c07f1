"""Naming the leaves of parameter trees: what freeze plans, optimizer masks, checkpoint
comparisons and exports all need, below every layer that uses it."""

from __future__ import annotations

from typing import Any, Sequence

import jax


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


def overlay(tree: Any, partial: Any) -> Any:
  """`tree` with each leaf that `partial` holds at the same path (a view of some of the
  leaves: optax.MaskedNode or absent elsewhere) put in its place."""
  values = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(partial)[0]}
  return jax.tree_util.tree_map_with_path(lambda p, v: values.get(path_str(p), v), tree)
