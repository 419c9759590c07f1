"""Orbax checkpoints of the whole train state, plus where the run stood (phase, epoch).

`DIR/checkpoints/<step>/` holds two items: `state` (the TrainState pytree) and `meta`
(JSON: step, phase index and name, epochs done in that phase, epochs done in the run).
Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint that was being written when the process died is never picked up.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from fineflax.state import TrainState


class Checkpoints:
  """The latest `keep` checkpoints of a run directory."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                          item_names=('state', 'meta'))

  def latest_meta(self) -> dict[str, Any] | None:
    """The `meta` of the newest complete checkpoint, or None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def save(self, state: TrainState, meta: dict[str, Any]) -> None:
    """Saves `state` under step `meta['step']` (asynchronously; see `wait`)."""
    self._manager.save(meta['step'], args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, target: TrainState) -> TrainState:
    """The state saved at `step`, with the tree structure and shardings of `target`.

    `target` must be the state of the checkpoint's phase (its optimizer state covers
    that phase's trainable leaves); a tree of another shape is an error, not a partial
    restore.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    return restored['state']

  def wait(self) -> None:
    """Blocks until every save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.close()
