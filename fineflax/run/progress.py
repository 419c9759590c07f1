"""Progress of one training epoch: a redrawn bar on a terminal, log lines elsewhere.

The train step returns its metric sums as device arrays, and reading one blocks until
the step has run: per-step reads would stall the host while the device works and leave
the device idle while the host prepares the next batch. So `Progress.update` only
queues them; now and then (`interval`) the oldest entries that are already computed
(`jax.Array.is_ready()`, which never blocks) are fetched in one `jax.device_get` and
added to host totals. Steps finish in the order they were dispatched, so the ready
entries are a prefix of the queue.
"""

from __future__ import annotations

import collections
import math
import shutil
import sys
import time
from typing import Any, Mapping, TextIO

import jax

from fineflax.config import registry

MODES = ('bar', 'lines', 'off', 'auto')  # config.report.progress
_BAR_INTERVAL = 0.5  # seconds between redraws of the bar
_LINES_INTERVAL = 2.0  # seconds between checks whether a log line is due
_LINES_PER_EPOCH = 10  # a line every 10% of the epoch

registry.register_choices('report.progress', MODES)


def _is_ready(value: Any) -> bool:
  """Whether reading `value` would not block; host values always are."""
  is_ready = getattr(value, 'is_ready', None)
  return is_ready is None or bool(is_ready())


def _duration(seconds: float) -> str:
  """`M:SS`, or `H:MM:SS` from an hour on."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Progress:
  """Shows how far an epoch is: batches done/total, running loss and accuracy, images/s,
  elapsed time and ETA.

  Modes: 'bar' redraws one line with '\\r' (a newline at `close`); 'lines' writes a log
  line every 10% of the epoch and one at the end, for logs that are not terminals;
  'off' writes nothing; 'auto' is 'bar' on a TTY and 'lines' otherwise. Processes other
  than 0 write nothing, whatever the mode.

  The counts shown are of batches whose metrics have been fetched, so they may trail
  the steps dispatched by the few that are still running.
  """

  def __init__(self, total_batches: int, mode: str = 'auto', desc: str = '',
               stream: TextIO | None = None, batches_done: int = 0,
               interval: float | None = None,
               start_sums: Mapping[str, float] | None = None):
    """Starts the clock.

    Args:
      total_batches: batches in the whole epoch.
      mode: 'bar', 'lines', 'off' or 'auto'.
      desc: a prefix of every line, e.g. the phase and epoch.
      stream: where to write; sys.stderr when None (looked up now, not at import).
      batches_done: batches of this epoch done before (a run resumed mid-epoch).
      interval: seconds between fetches of ready metrics (and redraws); 0.5 for a bar,
        2 for lines when None.
      start_sums: host metric sums of the `batches_done` batches, so that the running
        loss and accuracy are over the whole epoch; images/s counts only new batches.
    """
    if mode not in MODES:
      raise ValueError(f'progress mode {mode!r}: expected one of {MODES}')
    self.stream = sys.stderr if stream is None else stream
    if jax.process_index() != 0:
      mode = 'off'
    elif mode == 'auto':
      isatty = getattr(self.stream, 'isatty', None)
      mode = 'bar' if isatty is not None and isatty() else 'lines'
    self.mode = mode
    self.desc = desc
    self.total = int(total_batches)
    self.batches_done = int(batches_done)
    self.completed = self.batches_done  # batches whose metrics are in `totals`
    self.interval = (interval if interval is not None else
                     _BAR_INTERVAL if mode == 'bar' else _LINES_INTERVAL)
    self._sums: dict[str, float] = {k: float(v) for k, v in (start_sums or {}).items()}
    self._start_count = self._sums.get('count', 0.0)
    self._pending: collections.deque[Mapping[str, Any]] = collections.deque()
    self._start = self._last_refresh = time.monotonic()
    self._line_every = max(self.total, 1) / _LINES_PER_EPOCH
    self._next_line = self._next_milestone(self.batches_done)
    self._drawn = 0  # characters of the bar drawn last, to blank what a shorter one leaves
    self._closed = mode == 'off'

  @property
  def pending(self) -> int:
    """Step results queued but not fetched yet."""
    return len(self._pending)

  @property
  def totals(self) -> dict[str, float]:
    """Host sums of the metrics fetched so far (with `start_sums`)."""
    return dict(self._sums)

  def update(self, metrics: Mapping[str, Any]) -> None:
    """Queues one train step's metric sums ({'loss', 'correct', 'count'}: device arrays
    or numbers); fetches and shows what is ready when `interval` has passed."""
    if self._closed:
      return
    self._pending.append(metrics)
    now = time.monotonic()
    if now - self._last_refresh >= self.interval:
      self._last_refresh = now
      self._fetch(block=False)
      self._show(now)

  def close(self) -> None:
    """Fetches every queued result (waiting for them) and shows the final state."""
    if self._closed:
      return
    self._closed = True
    self._fetch(block=True)
    now = time.monotonic()
    if self.mode == 'bar':
      self._draw_bar(now)
      self.stream.write('\n')
    else:
      self._write_line(f'{self.desc} done {self.completed}/{self.total}: '
                       f'{self._metrics_text()} | {self._images_text(now)} '
                       f'| {_duration(now - self._start)}'.lstrip())
    self.stream.flush()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _fetch(self, block: bool) -> None:
    """Adds the ready prefix of the queue (all of it when `block`) to the totals."""
    ready = 0
    for entry in self._pending:
      if not block and not all(_is_ready(v) for v in entry.values()):
        break
      ready += 1
    if not ready:
      return
    # One transfer for all of them, not one per array.
    for entry in jax.device_get([self._pending.popleft() for _ in range(ready)]):
      for key, value in entry.items():
        self._sums[key] = self._sums.get(key, 0.0) + float(value)
    self.completed += ready

  def _next_milestone(self, done: int) -> int:
    """The first batch count past `done` that is a multiple of 10% of the epoch."""
    return math.ceil((math.floor(done / self._line_every) + 1) * self._line_every - 1e-9)

  def _show(self, now: float) -> None:
    if self.mode == 'bar':
      self._draw_bar(now)
      self.stream.flush()
    elif self.completed >= self._next_line and self.completed < self.total:
      self._next_line = self._next_milestone(self.completed)
      percent = 100 * self.completed / max(self.total, 1)
      self._write_line(f'{self.desc} {self.completed}/{self.total} ({percent:.0f}%): '
                       f'{self._metrics_text()} | {self._images_text(now)} '
                       f'| {self._time_text(now)}'.lstrip())
      self.stream.flush()

  def _metrics_text(self) -> str:
    count = self._sums.get('count', 0.0)
    if not count:
      return 'loss - accuracy -'
    return (f"loss {self._sums.get('loss', 0.0) / count:.4f} "
            f"accuracy {self._sums.get('correct', 0.0) / count:.4f}")

  def _images_text(self, now: float) -> str:
    images = self._sums.get('count', 0.0) - self._start_count
    elapsed = now - self._start
    return f'{images / elapsed:.0f} img/s' if elapsed > 0 and images else '- img/s'

  def _time_text(self, now: float) -> str:
    elapsed = now - self._start
    new_batches = self.completed - self.batches_done
    if new_batches > 0:
      eta = _duration(elapsed / new_batches * max(self.total - self.completed, 0))
    else:
      eta = '?'
    return f'elapsed {_duration(elapsed)} ETA {eta}'

  def _draw_bar(self, now: float) -> None:
    width = shutil.get_terminal_size((100, 24)).columns - 1
    counts = f'{self.completed}/{self.total}'
    tail = (f'{counts} {self._metrics_text()} | {self._images_text(now)} '
            f'| {self._time_text(now)}')
    head = f'{self.desc} ' if self.desc else ''
    bar_width = max(10, min(30, width - len(head) - len(tail) - 3))
    filled = bar_width * min(self.completed, self.total) // max(self.total, 1)
    arrow = '>' if 0 < filled < bar_width else ''
    bar = ('=' * filled + arrow).ljust(bar_width)[:bar_width]
    line = f'{head}[{bar}] {tail}'[:width]
    self.stream.write('\r' + line + ' ' * max(self._drawn - len(line), 0))
    self._drawn = len(line)

  def _write_line(self, text: str) -> None:
    self.stream.write(text + '\n')
