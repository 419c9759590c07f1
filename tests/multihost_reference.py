"""One process on 4 devices, trained on the global batches of 2 processes of 2 devices.

    python -m tests.multihost_reference CONFIG WORKDIR PORT   (with 4 CPU devices)

A process of a multi-host run reads every P-th example of a split (its share) and draws
its local batches from that share; the global batch is the processes' local batches one
after the other. One process alone draws its batches from the whole split instead, so
to train on the same global batches it is given those of the processes, built with
fineflax's own `train_batches` run once per share.

The process joins a JAX distributed job of its own (one process) so that its all-reduces
run on gloo, as those of the two processes do: XLA's in-process all-reduce sums in
another order, and the rounding differences that makes grow, through Adam, into visible
ones (the gradient of a conv bias in front of training-mode BatchNorm is zero but for
rounding, and Adam scales it to a full learning-rate step).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np

PROCESSES = 2


def as_processes(
    train_batches: Callable[..., Iterator[Any]], processes: int = PROCESSES
) -> Callable[..., Iterator[Any]]:
  """`train_batches`, but yielding the global index batches of `processes` processes.

  Every process seeds its generator alike, so each share starts from a copy of `rng`.
  """
  from fineflax.data import dataset  # pylint: disable=g-import-not-at-top

  def batches(
      split: dataset.Split, global_batch: int, rng: np.random.Generator
  ) -> Iterator[dataset.Batch]:
    assert jax.process_count() == 1 and split.size % processes == 0, 'equal shares only'
    shares = [np.arange(p, split.size, processes) for p in range(processes)]
    local = [
        train_batches(
            dataset.Split(split.images[s], split.labels[s]),
            global_batch // processes,
            copy.deepcopy(rng),
        )
        for s in shares
    ]
    for parts in zip(*local, strict=True):
      yield {
          'index': np.concatenate([s[b['index']] for s, b in zip(shares, parts)]),
          'weight': np.concatenate([b['weight'] for b in parts]),
      }

  return batches


def main(config_arg: str, workdir: str, port: int) -> None:
  """Trains the config file `path[:arg]` in `workdir` as 2 processes would."""
  jax.distributed.initialize(
      coordinator_address=f'127.0.0.1:{port}',
      num_processes=1,
      process_id=0,
      coordinator_bind_address=f'127.0.0.1:{port}',
  )
  # pylint: disable=g-import-not-at-top
  from fineflax import data, train
  from fineflax.data import dataset
  from fineflax.run import reporting
  # pylint: enable=g-import-not-at-top
  reporting.setup_logging()
  if 'FINEFLAX_CACHE' in os.environ:
    jax.config.update('jax_compilation_cache_dir', str(Path(os.environ['FINEFLAX_CACHE']) / 'xla'))
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('reference_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  # Several processes never place the data on the devices (they gather host batches);
  # the same here, so that both compile the same step.
  config.data.device_resident = False
  data.train_batches = as_processes(dataset.train_batches)
  assert jax.device_count() == 4, jax.devices()
  train.train_and_evaluate(config, workdir)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
