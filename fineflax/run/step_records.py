"""Per-step training records (`config.report.every_steps`).

Every N steps, one record of those N steps: loss and accuracy (over their examples), the
learning rate of the last one, and images per second. It goes to metrics.jsonl, marked
`"kind": "step"` beside the epoch records (whose format is unchanged;
`MetricsLog.read()` returns those, `read_steps()` these), and to TensorBoard under
`step/`. As for the progress bar (fineflax.run.progress), the steps' metric sums stay on
the device, in the rows of the epoch's metrics array, until they are computed: a
window's record is written from a version of that array the loop knows to be computed,
so the step loop never waits for it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np

from fineflax.run.progress import is_ready, sum_rows

Record = dict[str, Any]


@dataclasses.dataclass
class _Window:
  end: int  # the window's last step
  first: int  # the step before the window's first step with metrics of this session
  seconds: float  # its training time, measured at dispatch
  carried: dict[str, float] | None  # sums of its steps in earlier epochs


class StepRecorder:
  """Collects a phase's step metrics into records of `every` steps each."""

  def __init__(
      self,
      every: int,
      phase: str,
      learning_rate: Callable[[int], float],
      first_step: int,
      write: Callable[[Record], None],
  ):
    """Args:
    every: steps a record covers; records are made at the steps that are multiples.
    phase: the phase's name, in every record.
    learning_rate: the phase's rate of its batch number (from 0).
    first_step: the run's step before the phase's first batch.
    write: takes each finished record (metrics.jsonl, TensorBoard).
    """
    self.every = every
    self.phase = phase
    self._learning_rate = learning_rate
    self._first_step = first_step
    self._write = write
    self._pending: collections.deque[_Window] = collections.deque()
    self._row0 = 0  # the run's step before row 0 of the epoch's metrics
    self._open_first: int | None = None  # `first` of the window being filled
    self._carried: dict[str, float] | None = None  # its sums in earlier epochs
    self._elapsed = 0.0  # training time of the window being filled, before `_since`
    self._since = time.perf_counter()

  def begin_epoch(self, row0_step: int, step: int) -> None:
    """An epoch starts, or resumes, at `step`; row r of its metrics is step
    `row0_step + r + 1`. Starts the window's clock."""
    self._row0 = row0_step
    if self._open_first is None:
      self._open_first = step
    self._since = time.perf_counter()

  def dispatched(self, step: int) -> None:
    """Step `step` was dispatched: a window ends at the multiples of `every`."""
    if step % self.every:
      return
    now = time.perf_counter()
    # Dispatch times: the host runs at most a few steps ahead of the devices, so over N
    # steps they measure the devices' pace.
    self._pending.append(
        _Window(step, self._open_first, self._elapsed + now - self._since, self._carried)
    )
    self._open_first, self._carried = step, None
    self._elapsed, self._since = 0.0, now

  def update(self, metrics: Any, batches: int) -> None:
    """Writes the records of the windows that the epoch's first `batches` rows of
    `metrics` complete, if `metrics` are computed (never waiting for them)."""
    if not is_ready(metrics):
      return
    if self._pending and self._pending[0].end <= self._row0 + batches:
      self._flush(np.asarray(jax.device_get(metrics)), self._row0 + batches)

  def end_epoch(self, rows: Any) -> None:
    """At an epoch's end, with its metric rows: writes every finished window's record,
    keeps the sums of the window being filled, and stops its clock (an evaluation
    between epochs is not training time)."""
    rows = np.asarray(jax.device_get(rows))
    last = self._row0 + len(rows)
    self._flush(rows, last)
    if self._open_first is not None and self._open_first < last:
      self._carried = sum_rows(rows[self._open_first - self._row0 :], self._carried)
    self._elapsed += time.perf_counter() - self._since

  def close(self, metrics: Any = None, batches: int = 0) -> None:
    """Writes the records of the finished windows that the epoch's first `batches` rows of
    `metrics` complete (waiting for them), and forgets the window being filled: a window
    cut short by the end of the phase, or by a stop, is not recorded."""
    if metrics is not None:
      self._flush(np.asarray(jax.device_get(metrics)), self._row0 + batches)
    self._pending.clear()
    self._open_first, self._carried = None, None

  def _flush(self, rows: np.ndarray, through: int) -> None:
    """Writes the records of the pending windows that end by step `through`."""
    while self._pending and self._pending[0].end <= through:
      window = self._pending.popleft()
      begin = max(window.first - self._row0, 0)
      sums = sum_rows(rows[begin : window.end - self._row0], window.carried)
      count = max(sums['count'], 1.0)
      self._write(
          {
              'kind': 'step',
              'phase': self.phase,
              'step': window.end,
              'steps': window.end - window.first,
              'loss': sums['loss'] / count,
              'accuracy': sums['correct'] / count,
              'learning_rate': self._learning_rate(window.end - self._first_step - 1),
              'images_per_sec': sums['count'] / max(window.seconds, 1e-9),
          }
      )
