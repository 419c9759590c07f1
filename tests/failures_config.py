"""The config of the runs tests/test_failures.py kills, and a hook that holds a save still.

With FINEFLAX_TEST_HOLD='<point>:<step>' the run's save of that step to
checkpoints/latest/ stops at one point of its writing (for 10 minutes, then the run exits)
after creating the file named by FINEFLAX_TEST_HELD; the test waits for that file and
kills the run with SIGKILL, so that it dies while the save is certainly in flight. The
points:

  write   before Orbax writes the step's `meta` (the arrays are being written beside it)
  commit  before it writes the step's `commit_success.txt`: everything else is written,
          the folder is not yet renamed to its step

Nothing else changes: the hook only waits, in Orbax's background thread.
"""

import os
import time
from pathlib import Path

import ml_collections

from fineflax import config as ffc
from tests import helpers

TMP_MARK = '.orbax-checkpoint-tmp'
_FILES = {'write': 'metadata', 'commit': 'commit_success.txt'}


def _held(path: Path, point: str, step: int) -> bool:
  """Whether Orbax writing `path` is the moment to hold: the file of `point`, in the
  temporary folder of `step` under checkpoints/latest/."""
  parts = path.parts
  folder = f'{step}{TMP_MARK}'
  if path.name != _FILES[point] or folder not in parts:
    return False
  at = parts.index(folder)
  if parts[at - 1] != 'latest':
    return False
  # The step's own commit file, not those of its items (state/, meta/).
  return point != 'commit' or path.parent.name == folder


def _install_hold(point: str, step: int, flag: str) -> None:
  """Makes Orbax's text writes (etils' path class) block at the chosen one."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  cls = type(epath.Path('/'))
  write_text = cls.write_text

  def holding_write_text(self, *args, **kwargs):
    if _held(Path(os.fspath(self)), point, step):
      Path(flag).write_text(f'{point}:{step}\n')
      time.sleep(600)  # the test's SIGKILL comes first; this ends a run left behind
      os._exit(3)  # pylint: disable=protected-access
    return write_text(self, *args, **kwargs)

  cls.write_text = holding_write_text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """One phase of 2 epochs of 4 steps on the digits, saved after every step."""
  config = helpers.tiny_config(
      ffc.phase(name='a', batchnorm='train', learning_rate=3e-3, epochs=2), max_examples=32
  )
  config.seed = 0
  config.model.head.dropout = 0.3
  config.data.augment.flip = 'horizontal'
  config.checkpoint.every_steps = 1
  config.checkpoint.keep = 3
  hold = os.environ.get('FINEFLAX_TEST_HOLD')
  if hold:
    point, step = hold.split(':')
    _install_hold(point, int(step), os.environ['FINEFLAX_TEST_HELD'])
  return ffc.finish(config, arg)
