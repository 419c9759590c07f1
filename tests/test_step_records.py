"""Per-step training records (`config.report.every_steps`): windows of N steps whose
losses add up to the epoch's, the schedule's learning rate, TensorBoard, a resume that
leaves no window twice, epoch records unchanged, and metrics read only once computed."""

import json

import jax
import numpy as np
import optax
import pytest

from fineflax import config as config_lib, train
from fineflax.distributed import preemption
from fineflax.run import RunDir, step_records
from fineflax.run.reporting import MetricsLog
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs

DEVICES = jax.devices()[:2]


def _config(every_steps=None, epochs=2):
  cfg = helpers.tiny_config(
      config_lib.phase(
          name='a', batchnorm='train', learning_rate=3e-3, schedule='cosine', epochs=epochs
      ),
      batch_size=16,
      max_examples=64,
      val_split=None,
      test_split=None,
  )  # 4 steps an epoch
  cfg.report.every_steps = every_steps
  cfg.report.plot = True  # the plot of epoch records among step records
  return cfg


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('step_records')
  train.train_and_evaluate(_config(), root / 'plain', devices=DEVICES)
  train.train_and_evaluate(_config(every_steps=2), root / 'steps', devices=DEVICES)
  return root


def test_windows_add_up_to_their_epochs_at_the_schedules_rate(runs):
  steps = MetricsLog(runs / 'steps').read_steps()
  epochs = MetricsLog(runs / 'steps').read()
  assert [(r['kind'], r['phase'], r['step'], r['steps']) for r in steps] == [
      ('step', 'a', s, 2) for s in (2, 4, 6, 8)
  ]
  # 64 examples an epoch, every one counted: an epoch's loss is the mean of its two
  # windows' (each of 32 examples), to float32 rounding of the device sums.
  for epoch, windows in zip(epochs, (steps[:2], steps[2:])):
    np.testing.assert_allclose(np.mean([w['loss'] for w in windows]), epoch['loss'], rtol=1e-6)
    np.testing.assert_allclose(
        np.mean([w['accuracy'] for w in windows]), epoch['accuracy'], rtol=1e-6
    )
  cosine = optax.cosine_decay_schedule(3e-3, decay_steps=8)
  for r in steps:  # the rate of the window's last update (batch step - 1 of the phase)
    np.testing.assert_allclose(r['learning_rate'], float(cosine(r['step'] - 1)), rtol=1e-6)
  assert all(r['images_per_sec'] > 0 for r in steps)


def test_epoch_records_are_those_of_a_run_without_step_records(runs):
  """The epoch records keep their format (the one plots and readers take) and
  their values: recording reads the metrics, it does not change the run."""
  drop = lambda rs: [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in rs]
  assert drop(MetricsLog(runs / 'steps').read()) == drop(MetricsLog(runs / 'plain').read())
  assert MetricsLog(runs / 'plain').read_steps() == []
  lines = [json.loads(line) for line in (runs / 'steps' / 'metrics.jsonl').read_text().splitlines()]
  assert [r.get('kind', 'epoch') for r in lines] == ['step', 'step', 'epoch'] * 2
  assert (runs / 'steps' / 'history.png').is_file()


def test_step_records_reach_tensorboard(runs):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  [events] = list((runs / 'steps' / 'tb').iterdir())
  got = {
      (e.step, v.tag)
      for e in tf.compat.v1.train.summary_iterator(str(events))
      for v in e.summary.value
  }
  for step in (2, 4, 6, 8):
    for key in ('loss', 'accuracy', 'learning_rate', 'images_per_sec'):
      assert (step, f'step/{key}') in got


def test_a_resumed_run_records_each_window_once(tmp_path, monkeypatch):
  """Stopped at step 3 (mid-window and mid-epoch) and resumed: the windows before the
  checkpoint are kept, none is written twice, and the records are those of an
  uninterrupted run (the first window after the resume covers only its remaining step)."""
  whole = tmp_path / 'whole'
  train.train_and_evaluate(_config(every_steps=2), whole, devices=DEVICES)
  monkeypatch.setattr(preemption.StopRequest, 'at', lambda self, step: step == 3)
  with pytest.raises(preemption.Preempted):
    train.train_and_evaluate(_config(every_steps=2), tmp_path / 'cut', devices=DEVICES)
  monkeypatch.undo()
  train.train_and_evaluate(_config(every_steps=2), tmp_path / 'cut', devices=DEVICES)
  cut, ref = MetricsLog(tmp_path / 'cut').read_steps(), MetricsLog(whole).read_steps()
  assert [(r['step'], r['steps']) for r in cut] == [(2, 2), (4, 1), (6, 2), (8, 2)]
  for a, b in zip(cut, ref):
    if a['steps'] == 2:
      np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6)
  assert RunDir(tmp_path / 'cut').results_json.is_file()


class _Pending:
  """Metrics that are not computed yet: reading them is an error until `done`."""

  def __init__(self, value):
    self.value, self.done = value, False

  def is_ready(self):
    return self.done

  def __array__(self, dtype=None, copy=None):
    assert self.done, 'read before it was ready: the step loop would have waited'
    return np.asarray(self.value, dtype)


def test_the_recorder_reads_metrics_only_once_they_are_computed():
  written = []
  recorder = step_records.StepRecorder(2, 'a', lambda i: 0.1, 0, written.append)
  recorder.begin_epoch(0, 0)
  rows = np.zeros((6, 3), np.float32)
  rows[:4] = (2.0, 1.0, 4.0)
  for step in range(1, 5):
    recorder.dispatched(step)
  metrics = _Pending(rows)
  recorder.update(metrics, 4)
  assert written == []  # not computed: not read
  metrics.done = True
  recorder.update(metrics, 1)
  assert written == []  # the first window's last row is not written yet
  recorder.update(metrics, 3)
  assert [(r['step'], r['steps'], r['loss'], r['accuracy']) for r in written] == [(2, 2, 0.5, 0.25)]
  recorder.close(metrics, 4)
  assert [r['step'] for r in written] == [2, 4]


def test_a_window_across_an_epoch_end_sums_both_epochs():
  """Windows of 3 steps over epochs of 4: the window of steps 4-6 takes step 4 from the
  first epoch's rows and steps 5-6 from the second's."""
  written = []
  recorder = step_records.StepRecorder(3, 'a', lambda i: 0.1, 0, written.append)
  epochs = [
      np.asarray([(1.0, 1.0, 2.0), (2.0, 0.0, 2.0), (3.0, 2.0, 2.0), (4.0, 1.0, 2.0)], np.float32),
      np.asarray([(5.0, 0.0, 2.0), (6.0, 2.0, 2.0), (7.0, 1.0, 2.0), (8.0, 0.0, 2.0)], np.float32),
  ]
  for e, rows in enumerate(epochs):
    recorder.begin_epoch(4 * e, 4 * e)
    for step in range(4 * e + 1, 4 * e + 5):
      recorder.dispatched(step)
    recorder.end_epoch(rows)
  recorder.close()
  assert [(r['step'], r['steps'], r['loss'], r['accuracy']) for r in written] == [
      (3, 3, 1.0, 0.5),
      (6, 3, 2.5, 0.5),
  ]
