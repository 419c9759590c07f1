"""EarlyStopping (fineflax/train/early_stopping.py) against sequences computed by hand and
against Keras' own EarlyStopping callback fed the same values."""

import json

import numpy as np
import pytest

from fineflax import config as config_lib
from fineflax.train.early_stopping import EarlyStopping
from fineflax.train.loop import Position


def _watch(watcher, values, monitor=None):
  """Feeds one value per epoch; returns [(improved, should_stop)] after each epoch,
  stopping where the loop stops (when should_stop turns True)."""
  out = []
  for epoch, value in enumerate(values, start=1):
    out.append((watcher.update({monitor or watcher.monitor: value}, epoch), watcher.should_stop))
    if watcher.should_stop:
      break
  return out


def _es_config(**keys):
  """A validated phase's `early_stopping` section (mode 'auto' resolved as in a run)."""
  cfg = config_lib.default_config()
  cfg.phases = (config_lib.phase(early_stopping=keys),)
  return config_lib.validate(cfg).phases[0].early_stopping


# Values that are exact in binary (multiples of 1/8), so that min_delta boundaries are
# exact comparisons, not rounding.


def test_min_mode_by_hand():
  watcher = EarlyStopping('val_loss', 'min', patience=2)
  got = _watch(watcher, [1.0, 0.75, 0.875, 0.5, 0.625, 0.5, 9.0])
  # Epoch 6 equals the best (0.5): not an improvement; it is the second epoch without one.
  assert got == [
      (True, False),
      (True, False),
      (False, False),
      (True, False),
      (False, False),
      (False, True),
  ]
  assert (watcher.best, watcher.best_epoch, watcher.wait) == (0.5, 4, 2)


def test_max_mode_by_hand():
  watcher = EarlyStopping('val_accuracy', 'max', patience=3)
  got = _watch(watcher, [0.25, 0.5, 0.375, 0.5, 0.625, 0.125, 0.5, 0.625, 0.75])
  assert [improved for improved, _ in got] == [True, True, False, False, True, False, False, False]
  assert [stop for _, stop in got] == [False] * 7 + [True]  # 3 epochs after epoch 5
  assert (watcher.best, watcher.best_epoch, watcher.wait) == (0.625, 5, 3)


def test_the_best_epoch_in_the_middle_of_a_phase():
  watcher = EarlyStopping('val_loss', 'min', patience=10)
  _watch(watcher, [2.0, 1.5, 0.25, 0.5, 1.0, 0.375])
  assert (watcher.best, watcher.best_epoch, watcher.wait) == (0.25, 3, 3)
  assert not watcher.should_stop


@pytest.mark.parametrize(
    'mode, values, improved, best',
    [
        # min: an improvement must beat best - 0.25; an equal-to-the-bound value does not.
        (
            'min',
            [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25],
            [True, False, False, True, False, False, True],
            0.25,
        ),
        # max: an improvement must beat best + 0.25; the small steps do not add up, since each
        # is compared with the best, not with the epoch before.
        (
            'max',
            [0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75],
            [True, False, False, True, False, False, True],
            0.75,
        ),
    ],
)
def test_min_delta(mode, values, improved, best):
  watcher = EarlyStopping(
      'val_loss' if mode == 'min' else 'val_accuracy', mode, patience=0, min_delta=0.25
  )
  assert [i for i, _ in _watch(watcher, values)] == improved
  assert watcher.best == best


@pytest.mark.parametrize('patience', [1, 2, 5])
def test_patience_stops_exactly_after_that_many_epochs_without_improvement(patience):
  watcher = EarlyStopping('val_loss', 'min', patience=patience)
  # Improves at epochs 1-3, then never again.
  got = _watch(watcher, [3.0, 2.0, 1.0] + [1.5] * 20)
  assert len(got) == 3 + patience  # the loop's last epoch
  assert [stop for _, stop in got] == [False] * (2 + patience) + [True]
  assert watcher.best_epoch == 3 and watcher.wait == patience


def test_an_improvement_resets_the_wait():
  watcher = EarlyStopping('val_loss', 'min', patience=2)
  got = _watch(watcher, [1.0, 2.0, 0.5, 2.0, 0.25, 2.0, 2.0, 0.0])
  assert [stop for _, stop in got] == [False] * 6 + [True]
  assert watcher.best_epoch == 5


def test_patience_zero_never_stops():
  watcher = EarlyStopping('val_loss', 'min', patience=0)
  got = _watch(watcher, [1.0] + [2.0] * 50)
  assert len(got) == 51 and not any(stop for _, stop in got)
  assert (watcher.best, watcher.best_epoch, watcher.wait) == (1.0, 1, 50)


def test_auto_mode_through_resolve_mode_and_the_config():
  assert config_lib.resolve_mode('val_loss', 'auto') == 'min'
  assert config_lib.resolve_mode('loss', 'auto') == 'min'
  assert config_lib.resolve_mode('val_accuracy', 'auto') == 'max'
  assert config_lib.resolve_mode('accuracy', 'auto') == 'max'
  assert config_lib.resolve_mode('val_accuracy', 'min') == 'min'  # an explicit mode stays
  by_loss = EarlyStopping.from_config(_es_config(monitor='val_loss', patience=1))
  by_accuracy = EarlyStopping.from_config(_es_config(monitor='val_accuracy', patience=1))
  assert (by_loss.mode, by_accuracy.mode) == ('min', 'max')
  assert _watch(by_loss, [1.0, 0.5, 0.75]) == [(True, False), (True, False), (False, True)]
  assert _watch(by_accuracy, [0.5, 0.75, 0.625]) == [(True, False), (True, False), (False, True)]


def test_auto_mode_given_directly_follows_keras():
  """`mode` is documented as Keras' EarlyStopping's: 'auto' minimises a loss (Keras infers
  the direction from the name) even when no config validation resolved it first."""
  watcher = EarlyStopping('val_loss', 'auto', patience=1)
  assert _watch(watcher, [1.0, 0.5, 0.75]) == [(True, False), (True, False), (False, True)]


def test_from_config_takes_every_setting():
  watcher = EarlyStopping.from_config(
      _es_config(monitor='val_accuracy', mode='min', patience=4, min_delta=0.5)
  )
  assert (watcher.monitor, watcher.mode, watcher.patience, watcher.min_delta) == (
      'val_accuracy',
      'min',
      4,
      0.5,
  )
  assert (watcher.best, watcher.best_epoch, watcher.wait) == (None, 0, 0)
  fresh = EarlyStopping.from_config(_es_config(patience=4), {})  # Position's default
  assert (fresh.best, fresh.best_epoch, fresh.wait) == (None, 0, 0)


@pytest.mark.parametrize('cut', [1, 2, 3, 4, 5])
def test_state_round_trip_through_a_checkpoint_meta_goes_on_as_if_uninterrupted(cut):
  """A run stopped after `cut` epochs and resumed from its checkpoint's meta (JSON, as
  Position.meta is saved) decides every later epoch as the run that went on."""
  es = _es_config(monitor='val_loss', patience=2, min_delta=0.125)
  values = [1.0, 0.75, 0.875, 0.5, 0.625, 0.375, 0.5, 0.5]
  whole = EarlyStopping.from_config(es)
  expected = _watch(whole, values)

  first = EarlyStopping.from_config(es)
  before = _watch(first, values[:cut])
  meta = json.loads(
      json.dumps(Position(phase_epochs_done=cut, early_stopping=first.state()).meta(7, 'p'))
  )
  resumed = EarlyStopping.from_config(es, Position.from_meta(meta).early_stopping)
  after = [
      (resumed.update({'val_loss': v}, epoch), resumed.should_stop)
      for epoch, v in enumerate(values[cut : len(expected)], start=cut + 1)
  ]
  assert before + after == expected
  assert resumed.state() == whole.state()
  # Epoch 6's 0.375 is not below 0.5 - 0.125: the second epoch without improvement.
  assert len(expected) == 6 and (resumed.best, resumed.best_epoch) == (0.5, 4)


def test_a_metric_the_run_does_not_report_is_named():
  watcher = EarlyStopping('val_accuracy', 'max', patience=1)
  with pytest.raises(ValueError, match="monitors 'val_accuracy'"):
    watcher.update({'val_loss': 1.0, 'val_accuracy': None}, 1)


# --- against Keras ------------------------------------------------------------------------


class _Model:
  """What keras.callbacks.EarlyStopping touches of a model (no restore_best_weights)."""

  stop_training = False


def _keras_run(keras, values, monitor, mode, patience, min_delta):
  """Keras' callback over `values`: (best, best_epoch 1-based, epochs run)."""
  callback = keras.callbacks.EarlyStopping(
      monitor=monitor, mode=mode, patience=patience, min_delta=min_delta
  )
  model = _Model()
  callback.set_model(model)
  callback.on_train_begin()
  epochs = 0
  for epoch, value in enumerate(values):
    callback.on_epoch_end(epoch, {monitor: value})
    epochs += 1
    if model.stop_training:
      break
  return float(callback.best), callback.best_epoch + 1, epochs


@pytest.mark.parametrize('mode', ['min', 'max'])
@pytest.mark.parametrize('patience, min_delta', [(1, 0.0), (2, 0.0), (3, 0.25), (2, 0.5)])
def test_agrees_with_keras_early_stopping(keras, mode, patience, min_delta):
  """Random walks on a 1/8 grid (ties and exact min_delta boundaries happen often):
  the same best, best epoch and last epoch as Keras for 20 sequences each."""
  rng = np.random.default_rng(patience * 10 + int(min_delta * 8))
  monitor = 'val_loss' if mode == 'min' else 'val_accuracy'
  for _ in range(20):
    values = list(np.cumsum(rng.integers(-3, 4, 25)) / 8 + 10)
    watcher = EarlyStopping(monitor, mode, patience=patience, min_delta=min_delta)
    ours = _watch(watcher, values)
    assert (watcher.best, watcher.best_epoch, len(ours)) == _keras_run(
        keras, values, monitor, mode, patience, min_delta
    ), values
