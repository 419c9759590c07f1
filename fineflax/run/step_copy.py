"""A complete Orbax step folder copied into another checkpoint folder, as a step Orbax
counts as complete there, with a `meta` of its own.

best/ holds the state latest/ has just saved: copying the saved files costs a fraction of
serializing the state again (on a local disk the arrays' files are hard links: nothing is
written). Orbax has no copy of a step between managers, hence this module; it follows
Orbax's marks of completeness (see fineflax.run.checkpoints):

  local disk:     the files go to `<step>.orbax-checkpoint-tmp-copy/`, renamed to `<step>/`
                  once all are there;
  Cloud Storage:  the files go to `<step>/` (objects copied by the service), the step's
                  `commit_success.txt` last.

A copy killed midway leaves a step that is not complete: never read, and deleted when
the folder is next opened (as what a killed save leaves).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from etils import epath

from fineflax import storage

# Orbax's mark of an unfinished local folder (`7.orbax-checkpoint-tmp`, and the items').
TMP_MARK = '.orbax-checkpoint-tmp'
# The file whose presence makes a step on Cloud Storage complete, for Orbax.
COMMIT_MARK = 'commit_success.txt'
# The JSON item every step of a run's folders has (JsonCheckpointHandler's file).
META_FILE = ('meta', 'metadata')
# The folder name of OCDBT's data files: written once, named by their content and never
# changed, so that a hard link to one is as good as a copy.
_OCDBT_DATA = 'd'


def copy_step(source: epath.Path, target: epath.Path, meta: dict[str, Any]) -> None:
  """Writes the complete step folder `source` as the step folder `target` (whose name is
  its step), with `meta` in place of the source's meta item.

  The caller checks that the folder holds no such step; what a killed copy left is gone
  once the folder has been opened (fineflax.run.checkpoints).

  Raises:
    OSError: a file could not be copied (what was written is not a complete step).
  """
  meta_text = json.dumps(meta)
  if storage.is_local(target):
    partial = target.with_name(f'{target.name}{TMP_MARK}-copy')
    shutil.copytree(os.fspath(source), os.fspath(partial), copy_function=_link_or_copy)
    partial.joinpath(*META_FILE).write_text(meta_text)  # over a copy, not a link
    partial.rename(target)  # atomic: the step is complete at once
    return
  for relative in sorted(_files(source)):
    if relative not in ((COMMIT_MARK,), META_FILE):
      source.joinpath(*relative).copy(target.joinpath(*relative))
  target.joinpath(*META_FILE).write_text(meta_text)
  source.joinpath(COMMIT_MARK).copy(target / COMMIT_MARK)


def _link_or_copy(source: str, target: str) -> None:
  """A hard link for OCDBT's data files where the file system allows one, else a copy
  (metadata files, which Orbax may write again, are always copied)."""
  if os.path.basename(os.path.dirname(source)) == _OCDBT_DATA:
    try:
      os.link(source, target)
      return
    except OSError:  # another file system, or one without hard links
      pass
  shutil.copy2(source, target)


def _files(root: epath.Path, parts: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  """The files under `root`, as tuples of path parts relative to it (epath's `walk`
  names gs:// folders without their scheme)."""
  found = []
  for child in root.joinpath(*parts).iterdir():
    if child.is_dir():
      found.extend(_files(root, (*parts, child.name)))
    else:
      found.append((*parts, child.name))
  return found
