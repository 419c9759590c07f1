"""Orbax checkpoints of the whole train state, plus where the run stood.

Two retention policies side by side, in folders of their own (an Orbax manager with a
`best_fn` would delete the latest checkpoint, so they must not share one):

  DIR/checkpoints/latest/<step>/  the last `keep` saves, for resuming; written after every
                                  epoch, every `every_steps` steps and on SIGTERM
  DIR/checkpoints/best/<step>/    the best save by `monitor` (e.g. val_loss, min)

Each step folder holds `state` (the TrainState pytree) and `meta` (JSON: step, phase,
epochs done, batches done in the current epoch, partial metric sums, early-stopping
state). Orbax writes a step into a temporary folder and renames it when complete: a
half-written step is never picked up (and is reported).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from fineflax.errors import ConfigError
from fineflax.freeze import path_str
from fineflax.state import TrainState

logger = logging.getLogger('fineflax.checkpoints')


class CheckpointMismatchError(ConfigError):
  """A checkpoint whose tree differs from the state the config builds."""


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a complete checkpoint (a step folder; temporary folders of
  interrupted saves do not count)."""
  directory = Path(directory)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def latest_dir(workdir: str | os.PathLike) -> Path:
  """Where a run's resumable checkpoints live."""
  return Path(workdir) / 'checkpoints' / 'latest'


def best_dir(workdir: str | os.PathLike) -> Path:
  """Where a run's best checkpoint lives."""
  return Path(workdir) / 'checkpoints' / 'best'


class Checkpoints:
  """The latest `keep` checkpoints in one folder."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    directory = Path(directory)
    if directory.is_dir():
      partial = sorted(p.name for p in directory.iterdir() if not p.name.isdigit())
      if partial:
        logger.warning('%s: ignoring %s, left by saves that did not finish', directory,
                       partial)
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
    """Saves `state` under step `meta['step']` (asynchronously; see `wait`).

    Raises:
      RuntimeError: the folder already holds that step or a later one (Orbax would skip
        the save without a word).
    """
    saved = self._manager.save(meta['step'], args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if not saved:
      raise RuntimeError(f'{self._manager.directory}: step {meta["step"]} was not saved; the '
                         f'folder already holds step {self._manager.latest_step()}')

  def restore(self, step: int, target: TrainState) -> TrainState:
    """The state saved at `step`, with the tree structure and shardings of `target`.

    `target` must be the state of the checkpoint's phase (its optimizer state covers
    that phase's trainable leaves). Orbax itself restores a tree of another shape
    partially and silently; here any difference is a CheckpointMismatchError.
    """
    saved = self._manager.item_metadata(step)['state']
    check_same_tree(leaf_specs(getattr(saved, 'tree', saved)), leaf_specs(target),
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


def remove_steps_after(directory: str | os.PathLike, step: int) -> None:
  """Deletes the step folders of `directory` after `step` (process 0; all when -1)."""
  directory = Path(directory)
  if jax.process_index() != 0 or not directory.is_dir():
    return
  for p in directory.iterdir():
    if p.name.isdigit() and int(p.name) > step:
      shutil.rmtree(p)


def params_source(path: str | os.PathLike) -> Path:
  """The folder of a parameter tree to start from (`config.init_from`): a run's best
  checkpoint (else its latest), a checkpoint step folder, or a converted checkpoint."""
  path = Path(path).expanduser()
  for folder in (best_dir(path), latest_dir(path)):
    if has_checkpoint(folder):
      path = max((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
      break
  if (path / 'state').is_dir():
    return path / 'state'
  if not path.is_dir():
    raise ConfigError(f'config.init_from={str(path)!r}: no such run, checkpoint or folder')
  return path


class RunCheckpoints:
  """A run's latest/ and best/ checkpoints (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, keep: int, monitor: str, mode: str):
    self.latest = Checkpoints(latest_dir(workdir), keep)
    self.best = Checkpoints(best_dir(workdir), 1)
    self.monitor, self.mode = monitor, mode
    best = self.best.latest_meta()
    self.best_value = best.get('value') if best else None

  def improved(self, value: float | None) -> bool:
    """Whether `value` of the monitored metric beats the best saved so far."""
    if value is None:
      return False
    if self.best_value is None:
      return True
    return value < self.best_value if self.mode == 'min' else value > self.best_value

  def save(self, state: TrainState, meta: dict[str, Any],
           record: dict[str, Any] | None = None) -> bool:
    """Saves to latest/; also to best/ when `record`'s monitored value improves on it.

    Returns whether best/ was written.
    """
    self.latest.save(state, meta)
    value = None if record is None else record.get(self.monitor)
    if not self.improved(value):
      return False
    self.best_value = value
    self.best.save(state, dict(meta, monitor=self.monitor, value=value))
    return True

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.latest.close()
    self.best.close()


def leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/backbone/conv1_conv/kernel': (shape, dtype)} of every leaf of `tree`."""
  return {path_str(path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_same_tree(saved: dict, expected: dict, where: str) -> None:
  """CheckpointMismatchError naming the leaves unless the two `leaf_specs` are equal."""
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
