"""Evaluation over a whole split: every example counted exactly once."""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax.sharding import Mesh

from fineflax import data, step
from fineflax.data import feed


def evaluate(eval_step: Callable[..., step.Metrics], variables: dict[str, Any],
             split: data.Split, batch_size: int, mesh: Mesh,
             resident: dict[str, jax.Array] | None = None) -> dict[str, float]:
  """Loss, accuracy and example count of `variables` on `split`.

  The last batch is padded with weight-0 rows, so no example is dropped or counted twice,
  whatever the batch size and the number of devices and processes.
  """
  batches = feed.device_batches(split, data.eval_batches(split, batch_size), mesh, resident)
  return step.summarize([eval_step(variables, b, resident or {}) for b in batches])
