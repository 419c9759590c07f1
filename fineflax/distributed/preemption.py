"""SIGTERM, the preemption signal of clusters: note it, so the run saves and exits.

One process notes the signal itself. The processes of a multi-host job must all save at
the same step (a save is collective), and a scheduler may signal them at different
moments, or only one of them: there JAX's preemption service, started by
`jax.distributed.initialize`, catches SIGTERM on any process and picks the step they all
stop at (`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """Raised once the run has saved after a SIGTERM; the same command resumes it."""


class StopRequest:
  """Whether the run should save and stop once a step is done."""

  def __init__(self, multi_process: bool = False):
    self._event = threading.Event()
    self._multi_process = multi_process

  def set(self) -> None:
    """Asks this process to stop (its SIGTERM handler; tests)."""
    self._event.set()

  def at(self, step: int) -> bool:
    """Whether to save and stop after `step` (1-based count of steps done). Called after
    every step: the preemption service needs each process to report every step."""
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


@contextlib.contextmanager
def sigterm_flag() -> Iterator[StopRequest]:
  """A StopRequest that SIGTERM sets while the block runs (the previous handler comes
  back after).

  In a multi-process job JAX's preemption service handles SIGTERM: no Python handler is
  installed, as it would replace the service's. Off the main thread (where handlers
  cannot be installed) a single process's request is never set by a signal.
  """
  if jax.process_count() > 1:
    yield StopRequest(multi_process=True)
    return
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: request.set())
  try:
    yield request
  finally:
    signal.signal(signal.SIGTERM, previous)
