"""Per-step training records (`config.report.every_steps = N`).

Every N steps, one record of those N steps: loss and accuracy (over their examples), the
learning rate of the last one, and images per second. It goes to metrics.jsonl, marked
`"kind": "step"` beside the epoch records (whose format is unchanged;
`MetricsLog.read()` returns those, `read_steps()` these), and to TensorBoard under
`step/`. As for the progress bar (fineflax.run.progress), a step's metric sums stay on the
device until they are computed: a window's record is written once its last step's
metrics are ready (`jax.Array.is_ready()`, which never blocks), so the step loop never
waits for them.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Mapping

import jax

Record = dict[str, Any]


def _is_ready(value: Any) -> bool:
  is_ready = getattr(value, 'is_ready', None)
  return is_ready is None or bool(is_ready())


class StepRecorder:
  """Collects a phase's step metrics into records of `every` steps each."""

  def __init__(self, every: int, phase: str, learning_rate: Callable[[int], float],
               first_step: int, write: Callable[[Record], None]):
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
    self._window: list[Mapping[str, Any]] = []
    self._pending: collections.deque = collections.deque()
    self._elapsed = 0.0  # training time of the current window before `_since`
    self._since = time.perf_counter()

  def add(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Adds step `step`'s metric sums (device arrays); writes the records now ready."""
    self._window.append(metrics)
    if step % self.every == 0:
      now = time.perf_counter()
      # Dispatch times: the host runs at most a few steps ahead of the devices (the
      # prefetch depth), so over N steps they measure the devices' pace.
      self._pending.append((step, self._window, self._elapsed + now - self._since))
      self._window, self._elapsed, self._since = [], 0.0, now
    self._flush(block=False)

  def close(self) -> None:
    """Writes every finished window's record (waiting for its metrics); a window cut
    short by the end of the phase is not recorded."""
    self._flush(block=True)
    self._window = []

  def pause(self) -> None:
    """At an epoch's end: writes the finished windows' records (their metrics are
    computed: the epoch's were fetched) and stops the window's clock (an evaluation
    between epochs is not training time)."""
    self._elapsed += time.perf_counter() - self._since
    self._flush(block=True)

  def resume(self) -> None:
    """Starts the window's clock again."""
    self._since = time.perf_counter()

  def _flush(self, block: bool) -> None:
    while self._pending and (block or _is_ready(self._pending[0][1][-1]['count'])):
      step, window, seconds = self._pending.popleft()
      sums = jax.tree.map(lambda *xs: sum(float(x) for x in xs), *jax.device_get(window))
      count = max(sums['count'], 1.0)
      self._write({'kind': 'step', 'phase': self.phase, 'step': step, 'steps': len(window),
                   'loss': sums['loss'] / count, 'accuracy': sums['correct'] / count,
                   'learning_rate': self._learning_rate(step - self._first_step - 1),
                   'images_per_sec': sums['count'] / max(seconds, 1e-9)})
