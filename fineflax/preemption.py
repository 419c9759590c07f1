"""SIGTERM, the preemption signal of clusters: note it, so the run saves and exits."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Preempted(Exception):
  """Raised once the run has saved after a SIGTERM; the same command resumes it."""


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
  """An event set by SIGTERM while the block runs (the previous handler comes back after).

  Off the main thread (where handlers cannot be installed) the event is never set.
  """
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield event
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGTERM, previous)
