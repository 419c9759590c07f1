"""Work done once for the whole job: process 0 first, the other processes after it.

With several processes, a weight file (or a dataset to prepare) that every process
fetches into the same cache would be downloaded N times at once, each process racing the
others on the same files. `process_zero_first` lets process 0 do it while the others
wait, then lets them run the same work, which finds the result in place and only checks
it.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from fineflax.distributed.join import DistributedError

logger = logging.getLogger('fineflax.distributed')

T = TypeVar('T')

# How long the other processes wait for process 0's work (read at each call: tests and
# long preparations may change it). A dead process 0 fails them sooner, through JAX's
# heartbeats (join.HEARTBEAT_TIMEOUT_S); this bounds a process 0 that lives but is stuck.
WAIT_TIMEOUT_S = 1800.0
_KEY_PREFIX = 'fineflax/process_zero_first'
# Calls per `what`: each call waits on a key of its own (a key is written once), and the
# n-th call of one process pairs with the n-th call of the others with the same `what`.
_calls: collections.Counter[str] = collections.Counter()


class ProcessZeroFailedError(DistributedError):
  """Process 0 failed at work the other processes waited for; they do not try it."""


def _client() -> Any:
  """The coordination service's client (`jax.distributed`'s key-value store), or None
  where JAX keeps it elsewhere than in this version."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top

    return distributed.global_state.client
  except (ImportError, AttributeError):
    return None


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split()) or '(no message)'
  return f'{type(error).__name__}: {text}'


def process_zero_first(what: str, fn: Callable[[], T], *, timeout_s: float | None = None) -> T:
  """`fn()`, run by process 0 first and by every other process once it has succeeded.

  Meant for work whose result every process reads from one place, such as a download into
  a cache: process 0 downloads and checks the file while the others wait, then they run
  `fn` too, find the file and only check it. With a cache of each host's own (not shared)
  they download it there themselves, all at once, after process 0 succeeded (a download
  is written to a temporary file and renamed, so processes of one host that fetch the same
  file at once still leave one good copy).

  When `fn` raises on process 0, it raises there as it would alone, and every other process
  raises ProcessZeroFailedError naming `what` and process 0's error, without running `fn`.
  Every process must call this with the same `what`, as many times (like a collective).
  One process alone just runs `fn()`.

  The wait goes through the coordination service of `jax.distributed` (its key-value
  store), not through a device collective: it compiles nothing, works the same with any
  backend (gloo on CPU included), has a timeout, and carries process 0's error message.
  Where this JAX hides that store, a barrier and a broadcast of a success flag over the
  devices (`multihost_utils`) do the same, without the message or the timeout.

  Args:
    what: the work, as messages name it ('fetching resnet50_notop.h5').
    fn: the work; its result is returned.
    timeout_s: how long the others wait for process 0 (default `WAIT_TIMEOUT_S`).
  Raises:
    ProcessZeroFailedError: on the other processes, when `fn` failed on process 0.
    DistributedError: on the other processes, when process 0 did not finish in time.
  """
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return fn()
  _calls[what] += 1
  key = f'{_KEY_PREFIX}/{_calls[what]}/{what}'
  client = _client()
  me, count = jax.process_index(), jax.process_count()
  if me == 0:
    try:
      result = fn()
    except BaseException as e:
      # Said before re-raising: the others would otherwise wait for the timeout.
      _announce(client, key, _one_line(e))
      raise
    _announce(client, key, None)
    return result
  logger.info('process %d: waiting for process 0 (%s)', me, what)
  error = _wait(client, key, what, WAIT_TIMEOUT_S if timeout_s is None else timeout_s)
  if error is not None:
    raise ProcessZeroFailedError(
        f'process {me} of {count}: process 0 failed at {what} (so ' f'not tried here): {error}'
    )
  return fn()


def _announce(client: Any, key: str, error: str | None) -> None:
  """Process 0's outcome, for the others: None (done) or its one-line error."""
  if client is not None:
    client.key_value_set(key, json.dumps({'error': error}))
    return
  multihost_utils.sync_global_devices(key)
  multihost_utils.broadcast_one_to_all(np.int32(error is None))


def _wait(client: Any, key: str, what: str, timeout_s: float) -> str | None:
  """Waits for process 0's outcome; its error (None when it succeeded)."""
  if client is None:
    multihost_utils.sync_global_devices(key)
    ok = multihost_utils.broadcast_one_to_all(np.int32(0))
    return None if int(ok) else '(its log says why)'
  try:
    value = client.blocking_key_value_get(key, int(timeout_s * 1000))
  except Exception as e:  # pylint: disable=broad-except
    # JAX raises its runtime error (DEADLINE_EXCEEDED) when the time is up.
    raise DistributedError(
        f'process {jax.process_index()} of {jax.process_count()}: waited '
        f'{timeout_s:g} s for process 0 to finish {what}, in vain '
        f'({" ".join(str(e).split())[:300]})'
    ) from None
  return json.loads(value)['error']
