"""Checkpoints restore exactly what was saved, and refuse a tree of another shape
(Orbax alone would restore it partially, without a word)."""

import errno
import os
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from fineflax.run import RunDir, checkpoints
from fineflax.train import state as state_lib
from tests import helpers


@pytest.fixture(scope='module')
def states():
  model = helpers.tiny_model()
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)

  def state_for(spec):
    optimizer = helpers.phase_optimizer(model, variables['params'], spec)
    return helpers.replicated_state(variables, optimizer, jax.devices()[:2], step=7)

  return {'conv5': state_for('layers[:43]'), 'all': state_for('none')}


def test_round_trip(tmp_path, states):
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(states['conv5'], {'step': 7, 'phase_index': 0})
  ckpts.close()
  ckpts = checkpoints.Checkpoints(tmp_path)  # as a resumed run reads it
  assert ckpts.latest_meta() == {'step': 7, 'phase_index': 0}
  restored = ckpts.restore(7, states['conv5'])
  assert jax.tree.structure(restored) == jax.tree.structure(states['conv5'])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states['conv5'])):
    np.testing.assert_array_equal(a, b)
  ckpts.close()


@pytest.mark.parametrize(
    'saved, target, message',
    [
        ('conv5', 'all', 'leaves missing from the checkpoint'),
        ('all', 'conv5', "leaves in the checkpoint but not in this config's state"),
    ],
)
def test_another_tree_is_refused(tmp_path, states, saved, target, message):
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(states[saved], {'step': 7})
  ckpts.close()
  ckpts = checkpoints.Checkpoints(tmp_path)
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    ckpts.restore(7, states[target])
  assert message in str(error.value)
  assert 'opt_state/inner_states/trainable/inner_state/0/mu/backbone/conv1' in str(error.value)
  assert str(tmp_path) in str(error.value)
  ckpts.close()


def test_best_and_latest_are_kept_side_by_side(tmp_path, states):
  """val_loss going up and down: best/ keeps its minimum, latest/ the last saves."""
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2, monitor='val_loss', mode='min')
  for step, value in enumerate([3.0, 2.0, 2.5, 1.0, 1.5, 1.2], start=1):
    wrote_best = ckpts.save(states['conv5'], {'step': step}, {'val_loss': value})
    assert wrote_best == (value in (3.0, 2.0, 1.0))
  ckpts.save(states['conv5'], {'step': 7})  # a mid-epoch save: no metrics, latest only
  ckpts.close()
  steps = lambda d: sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())
  assert steps(RunDir(tmp_path).latest) == [6, 7]
  assert steps(RunDir(tmp_path).best) == [4]
  again = checkpoints.RunCheckpoints(tmp_path, keep=2, monitor='val_loss', mode='min')
  assert again.best_value == 1.0 and not again.improved(1.1) and again.improved(0.9)
  # best/ is a copy of latest/'s step 4, which latest/ has since deleted.
  assert again.best.latest_meta() == {'step': 4, 'monitor': 'val_loss', 'value': 1.0}
  _assert_same_state(again.best.restore(4, states['conv5']), states['conv5'])
  again.close()


def _assert_same_state(restored, expected):
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_best_catches_up_on_resume_with_latest_s_files(tmp_path, states):
  """A run stopped between its two saves of an epoch: on resume best/ gets the step
  latest/ holds, its arrays' files linked, not written again, and latest/ keeps its meta."""
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=2, monitor='val_loss', mode='min')
  ckpts.latest.save(states['all'], {'step': 5})
  ckpts.close()
  again = checkpoints.RunCheckpoints(tmp_path, keep=2, monitor='val_loss', mode='min')
  assert not again.catch_up_best({'step': 5}, [{'step': 5, 'val_loss': None}])
  records = [{'step': 4, 'val_loss': 0.5}, {'step': 5, 'val_loss': 2.0}]
  assert again.catch_up_best({'step': 5}, records)
  assert again.best.latest_meta() == {'step': 5, 'monitor': 'val_loss', 'value': 2.0}
  assert again.latest.latest_meta() == {'step': 5}
  _assert_same_state(again.best.restore(5, states['all']), states['all'])
  again.close()
  latest, best = Path(RunDir(tmp_path).latest / '5'), Path(RunDir(tmp_path).best / '5')
  data = sorted(latest.rglob('d/*'))
  assert data and all((best / f.relative_to(latest)).stat().st_ino == f.stat().st_ino for f in data)


def test_a_half_written_step_is_ignored_with_a_warning(tmp_path, states, caplog):
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(states['conv5'], {'step': 3})
  ckpts.close()
  (tmp_path / '5.orbax-checkpoint-tmp-123').mkdir()  # what a killed save leaves
  with caplog.at_level('WARNING', logger='fineflax.checkpoints'):
    ckpts = checkpoints.Checkpoints(tmp_path)
  assert "ignoring ['5.orbax-checkpoint-tmp-123']" in caplog.text
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3']  # deleted before any save
  assert ckpts.latest_meta() == {'step': 3}
  ckpts.close()


def test_an_unfinished_step_still_being_written_is_left_with_a_warning(
    tmp_path, monkeypatch, caplog
):
  """A save that failed in part may still write its other files when the folder is opened
  again (a full disk): its folder cannot be deleted yet, which is no error."""
  (tmp_path / '5.orbax-checkpoint-tmp-123').mkdir()

  def busy(self, *args, **kwargs):
    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), 'd')

  monkeypatch.setattr(type(epath.Path('/')), 'rmtree', busy)
  with caplog.at_level('WARNING', logger='fineflax.checkpoints'):
    ckpts = checkpoints.Checkpoints(tmp_path)
  assert 'could not delete 5.orbax-checkpoint-tmp-123 yet' in caplog.text
  assert ckpts.latest_meta() is None
  ckpts.close()


def test_a_non_finite_monitored_value_never_becomes_the_best(tmp_path):
  ckpts = checkpoints.RunCheckpoints(tmp_path, keep=1, monitor='val_loss', mode='min')
  try:
    assert not ckpts.improved(float('nan')) and not ckpts.improved(float('inf'))
    assert ckpts.improved(2.5)  # nothing saved yet: any finite value is the best so far
    ckpts.best_value = 2.5
    assert not ckpts.improved(float('nan')) and ckpts.improved(1.0) and not ckpts.improved(3.0)
    ckpts.mode = 'max'
    assert not ckpts.improved(float('inf')) and ckpts.improved(3.0)
  finally:
    ckpts.close()


def test_leaves_of_another_shape_are_refused(tmp_path, states):
  """The same leaf paths with another shape or dtype (a head for another class count, a
  bfloat16 copy): Orbax alone would restore into them; this names the first such leaf."""
  state = states['conv5']
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(state, {'step': 3})
  ckpts.close()
  kernel = state.params['head']['dense']['kernel']
  wider = jax.tree_util.tree_map_with_path(
      lambda path, x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype) if x is kernel else x,
      state,
  )
  halved = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16) if x is kernel else x, state)
  for target, what in (
      (wider, 'params/head/dense/kernel: saved ((512, 10), '),
      (
          halved,
          "params/head/dense/kernel: saved ((512, 10), 'float32'), "
          "expected ((512, 10), 'bfloat16')",
      ),
  ):
    ckpts = checkpoints.Checkpoints(tmp_path)
    with pytest.raises(
        checkpoints.CheckpointMismatchError, match='leaves of another shape or dtype'
    ) as error:
      ckpts.restore(3, target)
    assert what in str(error.value), str(error.value)
    ckpts.close()
