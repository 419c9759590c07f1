"""Failures during a checkpoint save: a full disk, and a run killed with SIGKILL.

A full disk is simulated in the process: Orbax's writes of one step raise ENOSPC (or
tensorstore's array writes fail for real, under a file-size limit). A kill is a real
`python -m fineflax.train` killed with SIGKILL while a save is held in flight
(tests/failures_config.py), then started again.
"""

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from fineflax.run import RunDir, checkpoints
from fineflax.run.reporting import MetricsLog
from tests import helpers
from tests.helpers import ROOT

TMP = checkpoints.TMP_MARK
pytestmark = [
    pytest.mark.slow,  # trains runs, and kills the training program mid-save
    # After the first failed write of a save Orbax drops the futures and event loops of
    # the others, which Python reports when it collects them (in whichever test runs then).
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]


@pytest.fixture(scope='module')
def states():
  """Two train states of a small model that differ in every parameter."""
  return helpers.two_train_states()


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _no_space_for(monkeypatch, step, name):
  """Orbax's writes of the file `name` of `step` (any item's) fail: the disk is full.

  Returns an event set once one has failed.
  """
  cls = type(epath.Path('/'))
  write_text = cls.write_text
  failed = threading.Event()

  def full_disk_write_text(self, *args, **kwargs):
    path = Path(os.fspath(self))
    if path.name == name and f'{step}{TMP}' in path.parts:
      failed.set()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write_text(self, *args, **kwargs)

  monkeypatch.setattr(cls, 'write_text', full_disk_write_text)
  return failed


class _FileSizeLimit:
  """Writes past `limit` bytes of any file fail with EFBIG (SIGXFSZ ignored): tensorstore
  then fails to write the larger array files for real."""

  def __init__(self, limit):
    self.limit = limit

  def __enter__(self):
    self.handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.saved[1]))

  def __exit__(self, *exc):
    resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
    signal.signal(signal.SIGXFSZ, self.handler)


@pytest.mark.parametrize(
    'what, reported_by, reason',
    [
        pytest.param('metadata', 'wait', 'No space left on device', id='meta file, by wait'),
        pytest.param(
            'commit_success.txt',
            'save',
            'No space left on device',
            id='commit marker, by the next save',
        ),
        pytest.param('arrays', 'close', 'File too large', id='array files, by close'),
    ],
)
def test_a_failed_save_is_a_clear_error_and_keeps_the_previous_step(
    tmp_path, states, monkeypatch, what, reported_by, reason
):
  first, second = states
  # keep=1: a save that failed must not have removed the step before it.
  ckpts = checkpoints.Checkpoints(tmp_path, keep=1)
  ckpts.save(first, {'step': 1})
  ckpts.wait()
  with pytest.raises(checkpoints.CheckpointSaveError) as error:
    if what == 'arrays':
      with _FileSizeLimit(150_000):  # the metadata files are smaller, the arrays larger
        ckpts.save(second, {'step': 2})
        ckpts.close()  # reports it (and releases the manager all the same)
    else:
      with monkeypatch.context() as patch:
        failed = _no_space_for(patch, 2, what)
        ckpts.save(second, {'step': 2})
        if reported_by == 'wait':
          ckpts.wait()  # reports it
        assert failed.wait(60)  # in the background, while this thread goes on
      ckpts.save(second, {'step': 3})  # reports step 2's failure and saves nothing
  e = error.value
  assert (e.step, e.kept, e.directory) == (2, 1, tmp_path)
  assert e.errno == (errno.EFBIG if what == 'arrays' else errno.ENOSPC)
  message = str(e)
  assert message.startswith(f'{tmp_path}: could not save step 2: {reason} (')
  assert 'step 1 there is complete and is what the same command resumes from' in message
  assert ('free some space on that disk' in message) == (what != 'arrays')
  assert checkpoints.complete_steps(tmp_path) == [1]
  fresh = checkpoints.Checkpoints(tmp_path, keep=1)
  assert fresh.latest_meta() == {'step': 1}
  _assert_same(fresh.restore(1, first), first)
  fresh.close()

  # With space back, saving goes on (in the same manager when it is still open), and
  # still replaces step 1 (keep=1).
  if reported_by == 'close':
    ckpts = checkpoints.Checkpoints(tmp_path, keep=1)
  ckpts.save(second, {'step': 4})
  ckpts.close()
  assert checkpoints.complete_steps(tmp_path) == [4]
  fresh = checkpoints.Checkpoints(tmp_path, keep=1)
  _assert_same(fresh.restore(4, first), second)
  fresh.close()
  # What the failed save left is deleted (by Orbax, in the background, once opened).
  assert sorted(os.listdir(tmp_path)) == ['4']


def test_leftovers_of_killed_saves_and_removals_are_deleted_on_opening(tmp_path, states, caplog):
  first, _ = states
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(first, {'step': 1})
  ckpts.close()
  (tmp_path / f'2{TMP}' / f'state{TMP}').mkdir(parents=True)  # a save killed mid-way
  (tmp_path / f'9{TMP}-removed').mkdir()  # a removal killed mid-way
  (tmp_path / 'notes.txt').write_text('mine')
  with caplog.at_level('WARNING', logger='fineflax.checkpoints'):
    ckpts = checkpoints.Checkpoints(tmp_path)
  assert f"ignoring ['2{TMP}', '9{TMP}-removed'], left by saves" in caplog.text
  assert "ignoring ['notes.txt'], which are not checkpoints" in caplog.text
  ckpts.save(first, {'step': 2})  # the step whose save was killed saves again
  ckpts.close()
  assert sorted(os.listdir(tmp_path)) == ['1', '2', 'notes.txt']
  assert checkpoints.complete_steps(tmp_path) == [1, 2]
  checkpoints.remove_steps_after(tmp_path, 1)
  assert sorted(os.listdir(tmp_path)) == ['1', 'notes.txt']


def test_best_is_never_complete_before_latest(tmp_path, states, monkeypatch):
  """A kill between the two would leave best/ with a step that latest/ lacks (a new run
  refuses such a workdir): latest/'s commit is held back, and still comes first; best/'s
  step is a copy of latest/'s, complete in one rename."""
  first, _ = states
  cls = type(epath.Path('/'))
  write_text, rename = cls.write_text, cls.rename
  commits = []

  def slow_latest_write_text(self, *args, **kwargs):
    path = Path(os.fspath(self))
    if path.name == 'commit_success.txt' and path.parent.name == f'3{TMP}':  # the step's
      time.sleep(2)
    return write_text(self, *args, **kwargs)

  def recorded_rename(self, target):  # a local step is complete once renamed
    if Path(os.fspath(self)).name.startswith(f'3{TMP}'):
      commits.append(Path(os.fspath(self)).parent.name)
    return rename(self, target)

  monkeypatch.setattr(cls, 'write_text', slow_latest_write_text)
  monkeypatch.setattr(cls, 'rename', recorded_rename)
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2, monitor='val_loss', mode='min')
  assert ckpts.save(first, {'step': 3}, {'val_loss': 1.0})
  ckpts.close()
  assert commits == ['latest', 'best']


# --- SIGKILL of a real run while a save is in flight -------------------------------------


def _command(workdir):
  return [
      sys.executable,
      '-m',
      'fineflax.train',
      '--config',
      str(ROOT / 'tests' / 'failures_config.py'),
      '--workdir',
      str(workdir),
  ]


def _new_workdir(workdir):
  workdir.mkdir()
  # The sample preview takes seconds to draw and is not what these tests are about.
  (workdir / 'samples.png').write_bytes(b'')
  return workdir


def _run(workdir, cache):
  """The command to the end: its log."""
  done = subprocess.run(
      _command(workdir),
      cwd=ROOT,
      env=helpers.program_env(cache=cache),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stderr


def _run_and_kill(workdir, cache, hold):
  """The command, killed with SIGKILL while its save of `hold`'s step is in flight."""
  held, log = workdir.parent / 'held', workdir.parent / f'log-{hold.replace(":", "-")}'
  with log.open('w') as out:
    proc = subprocess.Popen(
        _command(workdir),
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=helpers.program_env(cache=cache, FINEFLAX_TEST_HOLD=hold, FINEFLAX_TEST_HELD=str(held)),
    )
    try:
      deadline = time.monotonic() + 240
      while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
      assert held.exists(), log.read_text()[-3000:]
      proc.send_signal(signal.SIGKILL)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  held.unlink()
  return log.read_text()


def _resumed_from(log):
  lines = [line for line in log.splitlines() if 'resuming from step ' in line]
  assert len(lines) == 1, log[-3000:]
  return int(lines[0].split('resuming from step ')[1].split(':')[0])


def _final_state(workdir):
  step = json.loads((workdir / 'results.json').read_text())['step']
  return ocp.StandardCheckpointer().restore(RunDir(workdir).latest / str(step) / 'state')


def _records(workdir):
  return [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in MetricsLog(workdir).read()]


def test_sigkill_during_saves_then_the_same_command_resumes_bitwise(tmp_path):
  """Killed while step 3's arrays are being written, then (resumed) while step 6 waits
  only for its commit: each time the next run goes on from the newest complete step and
  the run ends bit for bit where an uninterrupted one ends."""
  cache = tmp_path / 'cache'
  whole = _new_workdir(tmp_path / 'whole')
  _run(whole, cache)
  cut = _new_workdir(tmp_path / 'cut')
  latest = RunDir(cut).latest

  _run_and_kill(cut, cache, 'write:3')
  assert sorted(os.listdir(latest)) == ['1', '2', f'3{TMP}']
  assert not (latest / f'3{TMP}' / 'commit_success.txt').exists()

  log = _run_and_kill(cut, cache, 'commit:6')
  assert _resumed_from(log) == 2
  assert f"ignoring ['3{TMP}'], left by saves that did not finish" in log
  # keep=3; step 6 is written whole but was never renamed: it does not count.
  assert sorted(os.listdir(latest)) == ['3', '4', '5', f'6{TMP}']
  assert {'meta', 'state'} <= set(os.listdir(latest / f'6{TMP}'))

  log = _run(cut, cache)
  assert _resumed_from(log) == 5
  assert f"ignoring ['6{TMP}'], left by saves that did not finish" in log
  assert sorted(os.listdir(latest)) == ['6', '7', '8']
  # best/ holds the epoch of the lowest val_loss (which one depends on the CPU's arithmetic).
  best = min(_records(whole), key=lambda r: r['val_loss'])['step']
  assert os.listdir(RunDir(cut).best) == os.listdir(RunDir(whole).best) == [str(best)]
  _assert_same(_final_state(cut), _final_state(whole))
  assert _records(cut) == _records(whole)
  assert json.loads((cut / 'results.json').read_text()) == json.loads(
      (whole / 'results.json').read_text()
  )
