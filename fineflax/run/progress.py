"""Progress of one training epoch: a redrawn bar on a terminal, log lines elsewhere.

The train step writes its metric sums into a row of a device array of the epoch's rows
(`fineflax.train.step.TrainStep`), and reading a device array blocks until the step that
wrote it has run: a read per step would stall the host while the device works. So
`Progress.update` only keeps the newest version of that array it is given (the loop
gives it one it knows to be computed); now and then (`interval`) it fetches it, one
transfer whatever the epoch's length, and sums its rows on the host.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any, Mapping, TextIO

import jax
import numpy as np

from fineflax.config import registry

MODES = ('bar', 'lines', 'off', 'auto')  # config.report.progress
METRICS = ('loss', 'correct', 'count')  # the columns of a train step's row of metric sums
_BAR_INTERVAL = 0.5  # seconds between redraws of the bar
_LINES_INTERVAL = 2.0  # seconds between checks whether a log line is due
_LINES_PER_EPOCH = 10  # a line every 10% of the epoch

registry.register_choices('report.progress', MODES)


def is_ready(value: Any) -> bool:
  """Whether reading `value` would not block; host values always are."""
  is_ready = getattr(value, 'is_ready', None)
  return is_ready is None or bool(is_ready())


def sum_rows(rows: Any, start: Mapping[str, float] | None = None) -> dict[str, float]:
  """The metric sums of `rows` ((n, 3) in `METRICS` order) added to `start`, in float64
  and in row order, so that sums of consecutive parts equal the sum of the whole."""
  rows = np.asarray(rows, np.float64).reshape(-1, len(METRICS))
  begin = np.asarray([float((start or {}).get(k, 0.0)) for k in METRICS])
  # Running sums are sequential: a resumed epoch's (start + its rows) is the uninterrupted
  # epoch's sum to the bit, which a pairwise np.sum does not guarantee.
  totals = np.add.accumulate(np.concatenate([begin[None], rows]), axis=0)[-1]
  return {k: float(v) for k, v in zip(METRICS, totals)}


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

  def __init__(
      self,
      total_batches: int,
      mode: str = 'auto',
      desc: str = '',
      stream: TextIO | None = None,
      batches_done: int = 0,
      interval: float | None = None,
      start_sums: Mapping[str, float] | None = None,
  ):
    """Starts the clock.

    Args:
      total_batches: batches in the whole epoch.
      mode: 'bar', 'lines', 'off' or 'auto'.
      desc: a prefix of every line, e.g. the phase and epoch.
      stream: where to write; sys.stderr when None (looked up now, not at import).
      batches_done: batches of this epoch done before (a run resumed mid-epoch): rows
        of the metrics before this one are not this session's.
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
    self.interval = (
        interval if interval is not None else _BAR_INTERVAL if mode == 'bar' else _LINES_INTERVAL
    )
    self._start_sums = {k: float(v) for k, v in (start_sums or {}).items()}
    self._sums = dict(self._start_sums)
    self._start_count = self._sums.get('count', 0.0)
    self._latest: tuple[Any, int] | None = None  # (metrics rows, batches they cover)
    self._start = self._last_refresh = time.monotonic()
    self._line_every = max(self.total, 1) / _LINES_PER_EPOCH
    self._next_line = self._next_milestone(self.batches_done)
    self._drawn = 0  # characters of the bar drawn last, to blank what a shorter one leaves
    self._closed = mode == 'off'

  @property
  def pending(self) -> bool:
    """Whether metrics were given that are not in `totals` yet."""
    return self._latest is not None

  @property
  def totals(self) -> dict[str, float]:
    """Host sums of the metrics fetched so far (with `start_sums`)."""
    return dict(self._sums)

  def update(self, metrics: Any, batches: int) -> None:
    """Takes the epoch's metric rows (device array or numbers) whose first `batches` rows
    are written; fetches and shows them when `interval` has passed and they are
    computed (never waiting for them)."""
    if self._closed:
      return
    self._latest = (metrics, batches)
    now = time.monotonic()
    if now - self._last_refresh >= self.interval:
      self._last_refresh = now
      self._fetch(block=False)
      self._show(now)

  def close(self, metrics: Any = None, batches: int | None = None) -> None:
    """Takes the epoch's final metric rows (if given), fetches them (waiting for them)
    and shows the final state."""
    if self._closed:
      return
    if metrics is not None:
      self._latest = (metrics, batches)
    self._closed = True
    self._fetch(block=True)
    now = time.monotonic()
    if self.mode == 'bar':
      self._draw_bar(now)
      self.stream.write('\n')
    else:
      self._write_line(
          f'{self.desc} done {self.completed}/{self.total}: '
          f'{self._metrics_text()} | {self._images_text(now)} '
          f'| {_duration(now - self._start)}'.lstrip()
      )
    self.stream.flush()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _fetch(self, block: bool) -> None:
    """Sums the newest rows given, when they are computed (or when `block`)."""
    if self._latest is None or not (block or is_ready(self._latest[0])):
      return
    metrics, batches = self._latest
    self._latest = None
    rows = np.asarray(jax.device_get(metrics))[self.batches_done : batches]
    self._sums = sum_rows(rows, self._start_sums)
    self.completed = batches

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
      self._write_line(
          f'{self.desc} {self.completed}/{self.total} ({percent:.0f}%): '
          f'{self._metrics_text()} | {self._images_text(now)} '
          f'| {self._time_text(now)}'.lstrip()
      )
      self.stream.flush()

  def _metrics_text(self) -> str:
    count = self._sums.get('count', 0.0)
    if not count:
      return 'loss - accuracy -'
    return (
        f"loss {self._sums.get('loss', 0.0) / count:.4f} "
        f"accuracy {self._sums.get('correct', 0.0) / count:.4f}"
    )

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
    tail = (
        f'{counts} {self._metrics_text()} | {self._images_text(now)} ' f'| {self._time_text(now)}'
    )
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
