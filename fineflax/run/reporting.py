"""What a run reports: `metrics.jsonl` (one JSON object per epoch) and log lines.

Only process 0 writes files, so a multi-host run has one record of each epoch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
from absl import logging as absl_logging

from fineflax.run import RunDir

logger = logging.getLogger('fineflax.reporting')


def setup_logging() -> None:
  """fineflax's progress at INFO on stderr; the libraries' (Orbax logs every file it
  writes) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  logger = logging.getLogger('fineflax')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    logger.addHandler(handler)
    logger.propagate = False
  logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


class MetricsLog:
  """Appends epoch records to `DIR/metrics.jsonl`."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = RunDir(workdir).metrics_jsonl

  def read(self) -> list[dict[str, Any]]:
    """Every record written so far."""
    if not self.path.exists():
      return []
    records = []
    with self.path.open() as f:
      for line in f:
        if not line.strip():
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          # Only the last line can be cut short (a full disk during the append); the
          # epoch it recorded is redone after the resume.
          logger.warning('%s: ignoring a damaged record: %r', self.path, line[:80])
    return records

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after `step`: the epochs a resumed run will redo."""
    if jax.process_index() != 0 or not self.path.exists():
      return
    kept = [r for r in self.read() if r['step'] <= step]
    tmp = self.path.with_suffix('.tmp')
    tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    tmp.replace(self.path)

  def write(self, record: dict[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    with self.path.open('a') as f:
      f.write(json.dumps(record) + '\n')


def epoch_line(record: dict[str, Any], epochs_in_phase: int) -> str:
  """A one-line summary of an epoch record for the log."""
  val = ('' if record['val_loss'] is None else
         f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f} | ")
  return (f"[{record['phase']}] epoch {record['phase_epoch']}/{epochs_in_phase} "
          f"(run epoch {record['epoch']}, step {record['step']}): "
          f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} | {val}"
          f"{record['images_per_sec']:.0f} img/s")


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = Path(path)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(obj, indent=2) + '\n')
  tmp.replace(path)
