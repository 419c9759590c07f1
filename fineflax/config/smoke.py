"""The `:smoke` argument every config file accepts: the same workflow, a few steps a
phase."""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from fineflax.errors import ConfigError


def finish(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config file's argument: None (as written) or 'smoke'."""
  if arg in (None, ''):
    return config
  if arg == 'smoke':
    return smoke(config)
  raise ConfigError(f"config argument {arg!r}: expected nothing or 'smoke'")


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same workflow (backbone, head, phases, freeze specs), a few steps a phase.

  One epoch of two batches of 16 per phase, images read and used at 32x32 at most: runs on
  a CPU.
  """
  config = copy.deepcopy(config)  # keeps typed placeholders overridable from the command line
  config.batch_size = 16
  config.eval_batch_size = 16
  config.data.max_examples = 32
  if config.model.image_size is None or config.model.image_size > 32:
    config.model.image_size = 32
  if config.data.load_size is not None:
    config.data.load_size = min(config.data.load_size, 32)
  config.phases = tuple(_smoke_phase(p) for p in config.phases)
  return config


def _smoke_phase(p: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """One epoch at most; schedule keys that count epochs are fitted to it."""
  values: dict[str, Any] = {'epochs': min(p.epochs, 1)}
  if p.get('schedule') == 'step':
    values.update(schedule='constant', decay_epochs=())
  if p.get('warmup_epochs'):
    values['warmup_epochs'] = 0.0
  return with_values(p, **values)


def with_values(cfg: ml_collections.ConfigDict, **values: Any) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(cfg)
  for key, value in values.items():
    cfg[key] = value
  return cfg
