"""Keeps Gloo's connection lines out of a multi-host CPU run's standard output.

Gloo, the library behind JAX's CPU collectives across processes, prints "[Gloo] Rank R is
connected to N peer ranks..." with `std::cout` each time it builds a communicator: one
line per device and collective group, interleaved with the `test_accuracy:` lines that
scripts read from stdout. Gloo has no setting that turns them off, so the only place to
drop them is the file descriptor: fd 1 becomes a pipe, and a thread copies every other
line to the original stdout.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

GLOO_PREFIX = b'[Gloo] '
_DRAIN_TIMEOUT_S = 5.0
_installed = False


def _pump(source: int, target: int, prefix: bytes) -> None:
  """Copies lines from `source` to `target` until end of file, leaving out the lines
  that start with `prefix`."""
  with os.fdopen(source, 'rb') as lines, os.fdopen(target, 'wb', buffering=0) as out:
    for line in lines:  # a line as soon as its newline arrives; the last one at EOF
      if not line.startswith(prefix):
        out.write(line)


def drop_gloo_lines() -> None:
  """From now on, lines that Gloo prints to this process's stdout are dropped; all other
  output reaches stdout unchanged and in order. Idempotent.

  At exit the pipe is closed and its last lines are copied out (for up to
  `_DRAIN_TIMEOUT_S`, as a child process that inherited the pipe could hold it open).
  """
  global _installed
  if _installed:
    return
  _installed = True
  sys.stdout.flush()
  original = os.dup(1)
  reader, writer = os.pipe()
  os.dup2(writer, 1)
  os.close(writer)
  thread = threading.Thread(
      target=_pump,
      args=(reader, os.dup(original), GLOO_PREFIX),
      name='gloo-output-filter',
      daemon=True,
  )
  thread.start()

  def restore() -> None:
    try:
      sys.stdout.flush()
    except (OSError, ValueError):  # stdout closed or its reader gone
      pass
    os.dup2(original, 1)  # closes this process's end of the pipe: the thread sees EOF
    thread.join(_DRAIN_TIMEOUT_S)

  atexit.register(restore)
