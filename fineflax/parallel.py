"""The device mesh and the host -> device placement of state and batches.

One mesh axis, `batch`, over every device of every process. Parameters and optimizer
state are replicated; a batch is a global `jax.Array` sharded on its leading axis, each
process contributing its own slice of it.
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
    raise ValueError(f'{what}={batch_size} does not split evenly over {n} devices; '
                     f'use a multiple of {n}')


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """A global batch (the same numpy arrays on every process) -> sharded global arrays.

  Each process transfers only the rows its own devices hold.
  """
  sharding = NamedSharding(mesh, P(AXIS))
  count, index = jax.process_count(), jax.process_index()

  def place(x: np.ndarray) -> jax.Array:
    rows = len(x) // count
    local = x[index * rows:(index + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, x.shape)

  return {k: place(v) for k, v in batch.items()}
