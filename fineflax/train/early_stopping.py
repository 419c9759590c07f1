"""Keras' EarlyStopping for one phase: stop after `patience` epochs without improvement."""

from __future__ import annotations

import dataclasses
from typing import Any

from fineflax.config import resolve_mode


@dataclasses.dataclass
class EarlyStopping:
  """The watcher of one phase; its fields go into checkpoints, so a resumed run goes on.

  Attributes:
    monitor, mode, patience, min_delta: as Keras' EarlyStopping (patience 0: never stop).
    best: the best value seen in the phase; best_epoch: the phase epoch (1-based) of it.
    wait: epochs since the last improvement.
  """

  monitor: str = 'val_loss'
  mode: str = 'min'
  patience: int = 0
  min_delta: float = 0.0
  best: float | None = None
  best_epoch: int = 0
  wait: int = 0

  def __post_init__(self):
    self.mode = resolve_mode(self.monitor, self.mode)  # 'auto' as Keras reads it

  @classmethod
  def from_config(cls, cfg: Any, saved: dict[str, Any] | None = None) -> 'EarlyStopping':
    """The watcher of `phase.early_stopping`, carrying on from `saved` when resuming."""
    watcher = cls(cfg.monitor, cfg.mode, cfg.patience, cfg.min_delta)
    for key in ('best', 'best_epoch', 'wait'):
      if saved and key in saved:
        setattr(watcher, key, saved[key])
    return watcher

  def update(self, record: dict[str, Any], phase_epoch: int) -> bool:
    """Takes an epoch's record; returns whether it is the phase's best so far."""
    value = record.get(self.monitor)
    if value is None:
      raise ValueError(
          f'early stopping monitors {self.monitor!r}, which this run does not '
          'report (no validation split?)'
      )
    better = self.best is None or (
        value < self.best - self.min_delta
        if self.mode == 'min'
        else value > self.best + self.min_delta
    )
    if better:
      self.best, self.best_epoch, self.wait = value, phase_epoch, 0
    else:
      self.wait += 1
    return better

  @property
  def should_stop(self) -> bool:
    """Whether `patience` epochs went by without an improvement."""
    return self.patience > 0 and self.wait >= self.patience

  def state(self) -> dict[str, Any]:
    """What a checkpoint keeps of it."""
    return {'best': self.best, 'best_epoch': self.best_epoch, 'wait': self.wait}
