"""The device mesh and the host -> device placement of state and batches.

One mesh axis, `batch`, over every device of every process. Parameters and optimizer
state are replicated; a batch is a global `jax.Array` sharded on its leading axis, each
process contributing its own rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `batch` over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  """Raises ValueError unless the global batch splits evenly over the mesh's devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(
        f'{what}={batch_size} does not split evenly over {n} devices; ' f'use a multiple of {n}'
    )


def shard_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows of a global batch -> global arrays sharded on the batch axis.

  Every process passes its own rows (the same number on each); the global batch is their
  concatenation in process order.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  count = jax.process_count()

  def place(x: np.ndarray) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, x, (len(x) * count,) + x.shape[1:])

  return {k: place(v) for k, v in local.items()}


def shard_plan(plan: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """An epoch's batch plan ((steps, batch) arrays, one process) on the devices, each
  device holding its columns: row i's columns are what `shard_batch` gives it of batch i."""
  sharding = NamedSharding(mesh, P(None, AXIS))
  return {k: jax.device_put(v, sharding) for k, v in plan.items()}
