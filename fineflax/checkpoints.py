"""Orbax checkpoints of the whole train state, plus where the run stood (phase, epoch).

`DIR/checkpoints/<step>/` holds two items: `state` (the TrainState pytree) and `meta`
(JSON: step, phase index and name, epochs done in that phase, epochs done in the run).
Orbax writes each step into a temporary directory and renames it when complete, so a
checkpoint that was being written when the process died is never picked up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fineflax.errors import ConfigError
from fineflax.freeze import path_str
from fineflax.state import TrainState


class CheckpointMismatchError(ConfigError):
  """A checkpoint whose tree differs from the state the config builds."""


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a complete checkpoint (a step folder; temporary folders of
  interrupted saves do not count)."""
  directory = Path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class Checkpoints:
  """The latest `keep` checkpoints of a run directory."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    # Handlers named up front: a manager that has not saved yet can read metadata.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                          item_handlers=handlers)

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
    that phase's trainable leaves). Orbax itself restores a tree of another shape
    partially and silently; here any difference is a CheckpointMismatchError.
    """
    saved = self._manager.item_metadata(step)['state']
    _check_same_tree(_leaf_specs(getattr(saved, 'tree', saved)), _leaf_specs(target),
                     f'{self._manager.directory}/{step}')
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


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {path_str(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_same_tree(saved: dict, expected: dict, where: str) -> None:
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  changed = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if not (missing or unexpected or changed):
    return
  problems = []
  for what, keys in [('missing from the checkpoint', missing),
                     ('in the checkpoint but not in this config\'s state', unexpected)]:
    if keys:
      problems.append(f'{len(keys)} leaves {what}, e.g. {keys[:3]}')
  if changed:
    k = changed[0]
    problems.append(f'{len(changed)} leaves of another shape or dtype, e.g. {k}: '
                    f'saved {saved[k]}, expected {expected[k]}')
  raise CheckpointMismatchError(
      f'{where} holds another train state than this config builds (was the run started '
      f'with another config?): ' + '; '.join(problems))
