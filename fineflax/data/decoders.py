"""Decoding processes of a streamed split, started once and kept for every pass over it.

grain starts its worker processes for each iterator and has them produce a sequence
fixed when they start, so every epoch and every evaluation pass would start them again
(a second or more each: every worker imports jax). These processes instead take each
index batch as a pass reaches it, and write its images into a shared-memory slot that
this process copies out: batches in order, nothing read twice, and a pass may stop
anywhere (its requests still in flight are dropped).
"""

from __future__ import annotations

import collections
import multiprocessing
import traceback
import weakref
from typing import Any, Callable, Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]
_PREFETCH_BATCHES = 4  # per worker: batches asked ahead, each with a shared-memory slot


class _Pool:
  """`workers` decoding processes for one `BatchReader`, started once.

  Index batches go to the workers in turn, each keeping up to `_PREFETCH_BATCHES`
  requests and a shared-memory slot for each; each worker answers in order, so batch k
  of a pass is the next answer of worker k mod W (the turn goes on across passes).
  Several passes may be read at once: answers to another pass are kept for it, those to
  a pass abandoned are dropped.
  """

  def __init__(self, reader: Callable[[Batch], Batch], workers: int):
    context = multiprocessing.get_context('spawn')  # jax's threads make fork unsafe
    self.workers, self._procs, self._send, self._recv = workers, [], [], []
    self._slots: list[list[Any]] = [[None] * _PREFETCH_BATCHES for _ in range(workers)]
    self._free = [list(range(_PREFETCH_BATCHES)) for _ in range(workers)]
    self._asked: list[collections.deque] = [collections.deque() for _ in range(workers)]
    self._answers: dict[int, Any] = {}  # ticket -> batch (or error), not yet taken
    self._dropped: set[int] = set()
    self._ticket = self._turn = 0
    self.broken = False
    for w in range(workers):
      requests, send = context.Pipe(duplex=False)
      recv, answers = context.Pipe(duplex=False)
      proc = context.Process(
          target=_work, args=(requests, answers, reader), daemon=True, name=f'fineflax-decode-{w}'
      )
      proc.start()
      requests.close()
      answers.close()  # so that a worker's death ends its pipe here
      self._procs.append(proc)
      self._send.append(send)
      self._recv.append(recv)

  def _ask(self, w: int, batch: Batch, image_size: int) -> int:
    from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top

    slot = self._free[w].pop()
    size = len(batch['index']) * image_size**2 * 3
    shm = self._slots[w][slot]
    if shm is None or shm.size < size:
      if shm is not None:
        shm.close()
        shm.unlink()
      shm = self._slots[w][slot] = shared_memory.SharedMemory(create=True, size=max(size, 1))
    ticket, self._ticket = self._ticket, self._ticket + 1
    self._send[w].send((ticket, slot, shm.name, batch))
    self._asked[w].append(ticket)
    return ticket

  def _take(self, w: int) -> None:
    """Receives worker `w`'s next answer and frees its slot."""
    try:
      ticket, slot, shape, out, error = self._recv[w].recv()
    except (EOFError, OSError):
      self.broken = True
      self._procs[w].join(1)
      raise RuntimeError(
          f'fineflax.data.stream: decoding process {self._procs[w].pid} '
          f'ended (exit code {self._procs[w].exitcode})'
      ) from None
    self._asked[w].popleft()
    if error is None:
      view = np.ndarray(shape, np.uint8, buffer=self._slots[w][slot].buf)
      out['image'] = view.copy()  # the slot is reused; the batch may outlive it on a CPU
      del view
    self._free[w].append(slot)
    if ticket in self._dropped:
      self._dropped.discard(ticket)
    else:
      self._answers[ticket] = out if error is None else error

  def read(self, batches: Iterable[Batch], image_size: int) -> Iterator[Batch]:
    """The answers to `batches`, in order, requested as far ahead as the slots allow."""
    pending: collections.deque = collections.deque()  # (ticket, worker)
    source: Iterator[Batch] | None = iter(batches)
    try:
      while True:
        while source is not None and len(pending) < self.workers * _PREFETCH_BATCHES:
          w = self._turn
          if not self._free[w]:
            if pending:
              break  # the answers awaited below free it
            self._take(w)  # another pass's request holds it
            continue
          batch = next(source, None)
          if batch is None:
            source = None
            break
          pending.append((self._ask(w, batch, image_size), w))
          self._turn = (w + 1) % self.workers
        if not pending:
          return
        ticket, w = pending[0]
        while ticket not in self._answers:
          self._take(w)
        pending.popleft()
        answer = self._answers.pop(ticket)
        if isinstance(answer, tuple):
          error, where = answer
          error.add_note(f'in decoding process {self._procs[w].pid}:\n{where}')
          raise error
        yield answer
    finally:
      for ticket, _ in pending:
        if self._answers.pop(ticket, None) is None:
          self._dropped.add(ticket)

  def close(self) -> None:
    """Stops the workers and frees the slots (again: nothing)."""
    for send in self._send:
      try:
        send.send(None)
      except OSError:
        pass  # already ended
      send.close()
    for proc in self._procs:
      proc.join(5)
      if proc.is_alive():
        proc.kill()
        proc.join()
    for recv in self._recv:
      recv.close()
    for shm in (s for slots in self._slots for s in slots if s is not None):
      shm.close()
      shm.unlink()
    self._procs, self._send, self._recv, self._slots = [], [], [], []


def _work(requests: Any, answers: Any, reader: Callable[[Batch], Batch]) -> None:
  """A decoding process: reads each index batch asked and writes its images into the
  shared-memory slot named; ends at None, or when the training process has gone."""
  from multiprocessing import shared_memory  # pylint: disable=g-import-not-at-top

  attached: dict[int, Any] = {}
  try:
    while True:
      try:
        request = requests.recv()
      except (EOFError, OSError):
        return
      if request is None:
        return
      ticket, slot, name, batch = request
      try:
        out = reader(batch)
        image = out.pop('image')
        if slot not in attached or attached[slot].name != name:
          if slot in attached:
            attached[slot].close()
          attached[slot] = shared_memory.SharedMemory(name=name)
        np.ndarray(image.shape, np.uint8, buffer=attached[slot].buf)[...] = image
        answers.send((ticket, slot, image.shape, out, None))
      except Exception as e:  # pylint: disable=broad-except
        where = traceback.format_exc()
        try:
          answers.send((ticket, slot, None, None, (e, where)))
        except Exception:  # pylint: disable=broad-except
          answers.send((ticket, slot, None, None, (RuntimeError(repr(e)), where)))
  finally:
    for shm in attached.values():
      shm.close()


_pools: dict[int, _Pool] = {}  # id(split) -> its workers, while the split lives


def read(split: Any, reader: Callable[[Batch], Batch], batches: Iterable[Batch]) -> Iterator[Batch]:
  """The answers of `reader` to `batches`, in order, from `split`'s decoding processes
  (`split.workers` of them): started at its first read, stopped when it is garbage (or
  at exit, or by `close_workers`)."""
  key = id(split)
  if key in _pools and _pools[key].broken:
    _close(key)
  if key not in _pools:
    try:
      _pools[key] = _Pool(reader, split.workers)
    except BaseException:
      _close(key)
      raise
    weakref.finalize(split, _close, key)
  return _pools[key].read(batches, split.image_size)


def _close(key: int) -> None:
  pool = _pools.pop(key, None)
  if pool is not None:
    pool.close()


def close_workers() -> None:
  """Stops every split's decoding processes (a later read starts them again)."""
  for key in list(_pools):
    _close(key)
