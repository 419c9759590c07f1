"""A config key's description (`Field`): default, accepted types, meaning and value
check; the checks several keys share; a section of keys built into a ConfigDict."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: default, accepted types, meaning, and an optional value check."""

  default: Any
  types: tuple[type, ...]
  help: str
  optional: bool = False  # None allowed
  check: Callable[[Any], str | None] | None = None  # returns an error text or None


def at_least(low: float) -> Callable[[Any], str | None]:
  """The check of a number that must be >= `low`."""
  return lambda v: None if v >= low else f'must be >= {low}'


def positive(v: Any) -> str | None:
  """A number > 0."""
  return None if v > 0 else 'must be > 0'


def fraction(v: Any) -> str | None:
  """A number in [0, 1)."""
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def class_weight(v: Any) -> str | None:
  """'balanced', or one weight >= 0 per class."""
  if isinstance(v, str):
    return None if v == 'balanced' else "expected 'balanced' or one weight per class"
  if not v or not all(
      isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in v
  ):
    return 'must be a non-empty tuple of weights >= 0, one per class'
  return None


def crop(v: Any) -> str | None:
  """A side in pixels, or 'random_resized'."""
  if isinstance(v, str):
    return None if v == 'random_resized' else "expected a side in pixels or 'random_resized'"
  return positive(v)


def hidden_widths(v: Any) -> str | None:
  """Positive ints: the widths of hidden Dense layers."""
  if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in v):
    return 'must be a tuple of positive ints (the widths of hidden Dense layers)'
  return None


INT, FLOAT, STR, BOOL, SEQ = (int,), (float, int), (str,), (bool,), (tuple, list)
# The metrics a checkpoint or early stopping may watch (`_ema`: of the weights' moving
# average, config.ema).
METRICS = ('loss', 'accuracy', 'val_loss', 'val_accuracy', 'val_loss_ema', 'val_accuracy_ema')


def build(schema: dict[str, Any]) -> ml_collections.ConfigDict:
  """The ConfigDict of a section of Fields, every key at its default."""
  out = ml_collections.ConfigDict()
  for key, field in schema.items():
    if isinstance(field, dict):
      out[key] = build(field)
    elif field.default is None and (len(field.types) == 1 or field.types == FLOAT):
      # A typed placeholder, so that `--config.key=value` can override it.
      out[key] = config_dict.placeholder(field.types[0])
    elif field.default is None:  # several types (a name or a tuple): set in a config file
      out[key] = None
    else:
      out[key] = field.default
  return out


def suggest(key: str, known) -> str:
  """' (did you mean ...?)' with the nearest of `known`, else the list of them."""
  close = difflib.get_close_matches(key, list(known), n=1)
  return f' (did you mean {close[0]!r}?)' if close else f'; known keys: {sorted(known)}'
