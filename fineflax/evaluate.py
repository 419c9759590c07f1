"""Evaluation over a whole split: every example counted exactly once."""

from __future__ import annotations

from typing import Any, Callable

from jax.sharding import Mesh

from fineflax import data, parallel, step


def evaluate(eval_step: Callable[..., step.Metrics], variables: dict[str, Any],
             split: data.Split, batch_size: int, mesh: Mesh) -> dict[str, float]:
  """Loss, accuracy and example count of `variables` on `split`.

  The last batch is padded with weight-0 rows, so no example is dropped or counted twice.
  """
  sums = [eval_step(variables, parallel.shard_batch(batch, mesh))
          for batch in data.eval_batches(split, batch_size)]
  return step.summarize(sums)
