"""Getting batches onto the devices: whole splits placed once, or host batches prefetched.

A split that fits (`config.data.device_resident`, under `device_resident_max_mb`) is copied
to every device once; each step then receives only indices and weights and gathers its
images on the device, so the accelerator never waits for the host. Otherwise the host
gathers each batch and transfers it while the previous step still runs.
"""

from __future__ import annotations

import collections
import itertools
import logging
from typing import Any, Iterable, Iterator, Mapping

import jax
from jax.sharding import Mesh

from fineflax.data import stream
from fineflax.data.dataset import AnySplit, Batch, Split, StreamSplit, gather
from fineflax.distributed import parallel

logger = logging.getLogger('fineflax.data')


def place(split: Split, mesh: Mesh) -> dict[str, jax.Array]:
  """The split's images and labels, replicated on every device of the mesh."""
  return parallel.replicate({'image': split.images, 'label': split.labels}, mesh)


def place_splits(
    splits: Mapping[str, Split | None], mesh: Mesh, enabled: bool, max_mb: int
) -> dict[str, dict[str, jax.Array] | None]:
  """The splits placed on the devices, if enabled, with one process, and under `max_mb`
  in all; {name: None} otherwise (the host then gathers every batch)."""
  if any(isinstance(s, StreamSplit) for s in splits.values()):
    return {name: None for name in splits}  # said where the pipeline was chosen
  total = sum(s.nbytes for s in splits.values() if s is not None)
  fits = enabled and jax.process_count() == 1 and total <= max_mb * 2**20
  logger.info(
      'data: %.1f MB in all, %s',
      total / 2**20,
      'placed on the devices' if fits else 'batches gathered on the host',
  )
  return {name: place(s, mesh) if fits and s is not None else None for name, s in splits.items()}


def prefetch(iterator: Iterable[Any], depth: int = 2) -> Iterator[Any]:
  """Runs `depth` items ahead: device transfers overlap the steps that come before."""
  queue: collections.deque = collections.deque()
  iterator = iter(iterator)
  for item in itertools.islice(iterator, depth):
    queue.append(item)
  while queue:
    yield queue.popleft()
    for item in itertools.islice(iterator, 1):
      queue.append(item)


def device_batches(
    split: AnySplit, batches: Iterable[Batch], mesh: Mesh, resident: dict[str, jax.Array] | None
) -> Iterator[dict[str, jax.Array]]:
  """Sharded global batches: indices for a resident split, images read by grain for a
  streamed one, else host-gathered images."""
  if isinstance(split, StreamSplit):
    host = stream.read_batches(split, batches)
  elif resident is not None:
    host = (b for b in batches)
  else:
    host = (gather(split, b) for b in batches)
  return prefetch(parallel.shard_batch(b, mesh) for b in host)
