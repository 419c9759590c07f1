"""Orbax checkpoints of the whole train state, plus where the run stood.

Two retention policies side by side, in folders of their own (an Orbax manager with a
`best_fn` would delete the latest checkpoint, so they must not share one):

  DIR/checkpoints/latest/<step>/  the last `keep` saves, for resuming; written after every
                                  epoch, every `every_steps` steps and on SIGTERM
  DIR/checkpoints/best/<step>/    the best save by `monitor` (e.g. val_loss, min): a copy
                                  of latest/'s step folder (fineflax.run.step_copy)

Each step folder holds `state` (the TrainState pytree) and `meta` (JSON: step, phase,
epochs done, batches done in the current epoch, partial metric sums, early-stopping
state). Orbax marks a step complete its own way: on a local disk it writes
`<step>.orbax-checkpoint-tmp/` and renames it to `<step>/`; on Cloud Storage, where a
rename is a copy, it writes `<step>/` in place and `commit_success.txt` last. Either way a
killed save leaves a step Orbax does not count as complete: it is never picked up, and
it is deleted when the folder is next opened (`_clear_unfinished`). Old steps are
deleted only after a newer one is complete.

A save that fails (a full disk, say) raises CheckpointSaveError from `save`, `wait` or
`close`, naming the folder, the step, the cause and the step that is still there intact.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
from typing import Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from fineflax import storage
from fineflax.errors import ConfigError, FineflaxError
from fineflax.pytree import path_str
from fineflax.run import RunDir, step_copy
from fineflax.run.step_copy import COMMIT_MARK, TMP_MARK

logger = logging.getLogger('fineflax.checkpoints')


# How tensorstore, which writes the arrays, reports an OS error: a ValueError whose text
# ends in e.g. "No space left on device [os_error_code='28']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class CheckpointMismatchError(ConfigError):
  """A checkpoint whose tree differs from the state the config builds."""


class CheckpointSaveError(FineflaxError, RuntimeError):
  """A save that could not be written (disk full, no permission, ...).

  Attributes:
    directory: the checkpoint folder.
    step: the step whose save failed (nothing of it is kept).
    kept: the newest complete step in the folder, untouched by the failure, or None.
    errno: the OS error number of the cause when there is one (errno.ENOSPC, ...).
  """

  def __init__(
      self, directory: epath.Path, step: int | None, cause: BaseException, kept: int | None
  ):
    self.directory, self.step, self.kept = directory, step, kept
    self.errno = os_errno(cause)
    reason = os.strerror(self.errno) if self.errno else type(cause).__name__
    detail = str(cause).strip().splitlines()[0][:400] if str(cause).strip() else ''
    what = f'step {step}' if step is not None else 'a step'
    kept_text = (
        f'step {kept} there is complete and is what the same command resumes from'
        if kept is not None
        else 'the folder holds no complete step yet'
    )
    hint = (
        '; free some space on that disk, then run the same command again'
        if self.errno in (errno.ENOSPC, errno.EDQUOT)
        else ''
    )
    super().__init__(
        f'{directory}: could not save {what}: {reason} '
        f'({type(cause).__name__}: {detail}); {kept_text}{hint}'
    )


def os_errno(error: BaseException | None) -> int | None:
  """The OS error number behind `error` (an OSError, or tensorstore's ValueError that
  quotes one), looking through its causes; None when there is none."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno:
      return error.errno
    match = _OS_ERROR_CODE.search(str(error))
    if match:
      return int(match.group(1))
    error = error.__cause__ or error.__context__
  return None


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """The steps of `directory` that Orbax finished writing, in order."""
  return sorted(ocp.path.step.checkpoint_steps(storage.as_path(directory)))


def save_variables(
    directory: str | os.PathLike, variables: dict[str, Any], meta: dict[str, Any], keep: int
) -> bool:
  """Saves `variables` ({'params', 'batch_stats'}) as step `meta['step']` of `directory`,
  a folder of weights a run keeps beside its train states (phase ends, WiSE-FT, a soup),
  which load_run and init_from read like the others; the `keep` newest steps stay. A step
  the folder already holds is left as it is (a resumed run saving it again). Returns
  whether it saved."""
  step = int(meta['step'])
  if step in complete_steps(directory):
    return False
  folder = Checkpoints(directory, keep)
  try:
    tree = {'step': np.asarray(step, np.int32), **variables}
    folder.save(tree, dict(meta, step=step))
  finally:
    folder.close()
  return True


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """Whether `directory` holds a complete checkpoint (steps whose save was killed do not
  count)."""
  return bool(complete_steps(directory))


class Checkpoints:
  """The latest `keep` checkpoints in one folder."""

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    self.directory = storage.absolute(directory, 'checkpoint folder')
    self.keep = keep
    self._pending: int | None = None  # the step whose save may still be running
    _clear_unfinished(self.directory)
    # latest/ and best/ (and phase_best/) may save the same step: across processes their
    # barriers would share Orbax's keys unless each folder names its own. Orbax's own
    # deletion of unfinished steps (cleanup_tmp_directories) runs in the background, where
    # it could delete a step that save_copy is writing: _clear_unfinished did it.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=False,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=self.directory.name
        ),
    )
    # Handlers named up front: a manager that has not saved yet can read metadata.
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_meta(self) -> dict[str, Any] | None:
    """The `meta` of the newest complete checkpoint, or None when there is none."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored['meta'])

  def save(self, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` under step `meta['step']` (asynchronously; see `wait`).

    Raises:
      CheckpointSaveError: this save, or the previous one still being written, failed;
        the error names the step.
      RuntimeError: the folder already holds that step or a later one (Orbax would skip
        the save without a word).
    """
    self.wait()  # a failure of the previous save is reported as that step's
    step = meta['step']
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      )
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._failed(step, e)
    if not saved:
      raise RuntimeError(
          f'{self.directory}: step {step} was not saved; the '
          f'folder already holds step {self._manager.latest_step()}'
      )
    self._pending = step

  def save_copy(self, source: epath.Path, meta: dict[str, Any]) -> None:
    """Saves a copy of `source`, a complete step folder of another Checkpoints (what
    `save` would write for the state saved there), as step `meta['step']` with `meta`;
    the `keep` newest steps stay. Every process of a job calls it; process 0 copies.

    Raises:
      CheckpointSaveError: the copy failed; the error names the step.
      RuntimeError: the folder already holds that step or a later one.
    """
    self.wait()
    step = int(meta['step'])
    try:
      if jax.process_index() == 0:
        held = complete_steps(self.directory)
        if held and held[-1] >= step:
          raise RuntimeError(
              f'{self.directory}: step {step} was not saved; the folder already holds '
              f'step {held[-1]}'
          )
        try:
          step_copy.copy_step(source, self.directory / str(step), meta)
        except Exception as e:  # pylint: disable=broad-exception-caught
          self._failed(step, e)
        for old in complete_steps(self.directory)[: -self.keep]:
          _remove_step(self.directory / str(old))
    finally:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f'{self.directory.name} copied step {step}')
      self._manager.reload()

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, with the tree structure and shardings of `target`.

    `target` must be the state of the checkpoint's phase (its optimizer state covers
    that phase's trainable leaves). Orbax itself restores a tree of another shape
    partially and silently; here any difference is a CheckpointMismatchError.
    """
    saved = self._manager.item_metadata(step)['state']
    check_same_tree(
        leaf_specs(getattr(saved, 'tree', saved)),
        leaf_specs(target),
        f'{self._manager.directory}/{step}',
    )
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored['state']

  def wait(self) -> None:
    """Blocks until every save has been written.

    Raises:
      CheckpointSaveError: the save being written failed (the steps before it are kept).
    """
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._failed(step, e)

  def close(self) -> None:
    """Waits for pending saves and releases the manager.

    Raises:
      CheckpointSaveError: the save being written failed (the manager is released).
    """
    try:
      self.wait()
    finally:
      self._manager.close()

  def _failed(self, step: int | None, error: Exception) -> NoReturn:
    """Raises the CheckpointSaveError of `error`, with the manager ready for another save.

    The failed step's temporary folder stays until the folder is next opened: Orbax
    reports the first of the step's writes that failed, while others may go on.
    """
    # Orbax dropped the steps this save was to replace from its list before it failed;
    # they are still on disk and must still count (and be deleted by a later save).
    try:
      self._manager.reload()
    except Exception:  # pylint: disable=broad-exception-caught
      logger.warning(
          '%s: could not list the steps again after a failed save', self.directory, exc_info=True
      )
    kept = [s for s in complete_steps(self.directory) if s != step]
    raise CheckpointSaveError(self.directory, step, error, kept[-1] if kept else None) from error


def _clear_unfinished(directory: epath.Path) -> None:
  """Deletes what saves and copies that did not finish left in `directory`, and logs
  anything else that is not a complete step (left alone). Process 0 deletes; every
  process of a job returns once it has."""
  if jax.process_index() == 0 and directory.is_dir():
    complete = {str(step) for step in complete_steps(directory)}
    others = sorted(p.name for p in directory.iterdir() if p.name not in complete)
    partial = [name for name in others if TMP_MARK in name or name.isdigit()]
    if partial:
      logger.warning(
          '%s: ignoring %s, left by saves that did not finish; deleting them', directory, partial
      )
      for name in partial:
        try:
          (directory / name).rmtree(missing_ok=True)
        except OSError as e:  # still written to by a save that failed in part
          logger.warning('%s: could not delete %s yet (%s)', directory, name, e)
    if set(others) - set(partial):
      logger.warning(
          '%s: ignoring %s, which are not checkpoints',
          directory,
          sorted(set(others) - set(partial)),
      )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'{directory.name} unfinished steps cleared')


def _remove_step(path: epath.Path) -> None:
  """Deletes a step folder so that no reader ever takes what is left of it for a complete
  step (Orbax deletes with a plain rmtree, which a kill can cut short)."""
  if storage.is_local(path):
    doomed = path.with_name(f'{path.name}{TMP_MARK}-removed')
    if doomed.exists():  # left by a removal that was killed
      doomed.rmtree()
    path.rename(doomed)  # atomic: the step is gone at once
    doomed.rmtree()
  else:
    # No atomic rename on an object store; without its mark the step is not complete.
    (path / COMMIT_MARK).unlink(missing_ok=True)
    path.rmtree(missing_ok=True)


def remove_steps_after(directory: str | os.PathLike, step: int) -> None:
  """Deletes the step folders of `directory` after `step` (process 0; all when -1); every
  process of a job calls it, and all return once they are gone (a save that follows must
  not find them)."""
  directory = storage.as_path(directory)
  if jax.process_index() == 0:
    for later in complete_steps(directory):
      if later > step:
        _remove_step(directory / str(later))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'{directory.name} steps removed')


class RunCheckpoints:
  """A run's latest/ and best/ checkpoints (see the module docstring)."""

  def __init__(self, workdir: str | os.PathLike, keep: int, monitor: str, mode: str):
    self.latest = Checkpoints(RunDir(workdir).latest, keep)
    self.best = Checkpoints(RunDir(workdir).best, 1)
    self.monitor, self.mode = monitor, mode
    best = self.best.latest_meta()
    self.best_value = best.get('value') if best else None

  def improved(self, value: float | None) -> bool:
    """Whether `value` of the monitored metric beats the best saved so far."""
    if value is None or not math.isfinite(value):
      return False
    if self.best_value is None:
      return True
    return value < self.best_value if self.mode == 'min' else value > self.best_value

  def save(self, state: Any, meta: dict[str, Any], record: dict[str, Any] | None = None) -> bool:
    """Saves to latest/; also to best/ when `record`'s monitored value improves on it.

    Returns whether best/ was written.
    """
    self.latest.save(state, meta)
    value = None if record is None else record.get(self.monitor)
    if not self.improved(value):
      return False
    # latest/ complete first: a run killed with best/ ahead of it would find a best/
    # checkpoint without one in latest/ to resume from (refused, and rightly so for a
    # latest/ deleted by hand).
    self.latest.wait()
    self._save_best(meta, value)
    return True

  def catch_up_best(self, meta: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """On resume from latest/'s step `meta['step']`: copies it to best/ when its epoch's
    record beats best/ (a run stopped between the two saves of that epoch left best/
    behind). Returns whether best/ was written."""
    record = next((r for r in reversed(records) if r.get('step') == meta['step']), None)
    value = None if record is None else record.get(self.monitor)
    if not self.improved(value):
      return False
    self._save_best(meta, value)
    return True

  def _save_best(self, meta: dict[str, Any], value: float) -> None:
    """best/ gets a copy of latest/'s (complete) step `meta['step']`."""
    self.best_value = value
    source = self.latest.directory / str(meta['step'])
    self.best.save_copy(source, dict(meta, monitor=self.monitor, value=value))

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    try:
      self.latest.close()
    finally:
      self.best.close()


def leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """{'params/backbone/conv1_conv/kernel': (shape, dtype)} of every leaf of `tree`."""
  return {
      path_str(path): (tuple(leaf.shape), str(leaf.dtype))
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_same_tree(saved: dict, expected: dict, where: str) -> None:
  """CheckpointMismatchError naming the leaves unless the two `leaf_specs` are equal."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  changed = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if not (missing or unexpected or changed):
    return
  problems = []
  for what, keys in [
      ('missing from the checkpoint', missing),
      ("in the checkpoint but not in this config's state", unexpected),
  ]:
    if keys:
      problems.append(f'{len(keys)} leaves {what}, e.g. {keys[:3]}')
  if changed:
    k = changed[0]
    problems.append(
        f'{len(changed)} leaves of another shape or dtype, e.g. {k}: '
        f'saved {saved[k]}, expected {expected[k]}'
    )
  raise CheckpointMismatchError(
      f'{where} holds another train state than this config builds (was the run started '
      f'with another config?): ' + '; '.join(problems)
  )
