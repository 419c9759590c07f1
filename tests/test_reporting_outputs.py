"""TensorBoard event files, history/confusion images, the epoch progress display and the
summary a run ends with."""

import io
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fineflax.data import tfrecord_index
from fineflax.run import RunDir, plots, progress, reporting, tensorboard

# --- TensorBoard -------------------------------------------------------------------------


@pytest.mark.parametrize(
    'data, expected',
    [
        (b'', 0x00000000),
        (b'123456789', 0xE3069283),
        (b'\x00' * 32, 0x8A9136AA),  # RFC 3720 B.4
        (b'\xff' * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
    ],
)
def test_crc32c_known_vectors(data, expected):
  assert tfrecord_index.crc32c(data) == expected


def test_summary_writer_is_read_back_by_tensorflow(tmp_path):
  with tensorboard.SummaryWriter(tmp_path) as writer:
    writer.scalar('loss', 0.75, step=0)
    writer.scalars({'loss': 0.5, 'accuracy': 0.875, 'val_loss': None}, step=7, prefix='train')
    writer.flush()
    writer.scalars({'images_per_sec': 1234.5}, step=2**40)  # a multi-byte varint
  files = list(tmp_path.iterdir())
  assert [f.name.startswith('events.out.tfevents.') for f in files] == [True]

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  events = list(tf.compat.v1.train.summary_iterator(str(files[0])))
  assert events[0].file_version == 'brain.Event:2'
  got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
  assert got == [
      (0, 'loss', 0.75),
      (7, 'train/loss', 0.5),
      (7, 'train/accuracy', 0.875),
      (2**40, 'images_per_sec', 1234.5),
  ]
  assert all(e.wall_time > 1.6e9 for e in events)


def test_second_writer_opens_a_new_file(tmp_path):
  with tensorboard.SummaryWriter(tmp_path) as first:
    first.scalar('a', 1.0, 1)
  with tensorboard.SummaryWriter(tmp_path) as second:
    second.scalar('a', 2.0, 2)
  assert first.path != second.path
  assert len(list(tmp_path.iterdir())) == 2


def test_importing_tensorboard_module_does_not_import_tensorflow():
  code = (
      'import sys, fineflax.run.tensorboard; '
      "print(sorted(m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorboard')))"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


# --- plots -------------------------------------------------------------------------------


def _record(epoch, phase_index, val):
  return {
      'phase': ['head', 'fine_tune'][phase_index],
      'phase_index': phase_index,
      'phase_epoch': epoch,
      'epoch': epoch,
      'step': 10 * epoch,
      'loss': 1.0 / epoch,
      'accuracy': 1 - 0.5 / epoch,
      'val_loss': 1.2 / epoch if val else None,
      'val_accuracy': 1 - 0.6 / epoch if val else None,
      'learning_rate': 1e-3,
      'images_per_sec': 100.0,
  }


def _png_size(path):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    image.load()  # a truncated file fails here
    return image.size


def test_history_with_two_phases_and_missing_validation(tmp_path):
  records = (
      [_record(e, 0, val=True) for e in (1, 2, 3)]
      + [_record(4, 1, val=False)]
      + [_record(e, 1, val=True) for e in (5, 6)]
  )
  path = tmp_path / 'history.png'
  plots.write_history(path, records)
  width, height = _png_size(path)
  assert 600 <= width <= 2000 and 250 <= height <= 1000
  assert [p.name for p in tmp_path.iterdir()] == ['history.png']  # no temporary left


def test_history_without_any_validation_and_one_epoch(tmp_path):
  path = tmp_path / 'history.png'
  plots.write_history(path, [_record(1, 0, val=False)])
  assert _png_size(path)[0] > 0


def test_history_of_no_records_writes_nothing(tmp_path):
  plots.write_history(tmp_path / 'history.png', [])
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('classes', [3, 25, 40])
def test_confusion_matrix_image(tmp_path, classes):
  rng = np.random.default_rng(0)
  matrix = rng.integers(0, 50, (classes, classes)) + 100 * np.eye(classes, dtype=int)
  path = tmp_path / 'confusion.png'
  plots.write_confusion(path, matrix, [f'class_{i}' for i in range(classes)], 'test split')
  width, height = _png_size(path)
  assert 300 <= width <= 2500 and 300 <= height <= 2500


def test_confusion_matrix_rejects_wrong_shape(tmp_path):
  with pytest.raises(ValueError, match='3 class names'):
    plots.write_confusion(tmp_path / 'c.png', np.zeros((2, 2)), ['a', 'b', 'c'])


# --- progress ----------------------------------------------------------------------------


class _Epoch:
  """An epoch's rows of metric sums (loss, correct, count) as the train step fills them:
  `step` writes the next row and returns a copy of the rows so far, as on the device."""

  def __init__(self, batches: int, done: int = 0):
    self.rows, self.done = np.zeros((batches, 3), np.float32), done

  def step(self, loss: float, correct: float, count: float) -> jnp.ndarray:
    self.rows[self.done] = (loss, correct, count)
    self.done += 1
    return jnp.asarray(self.rows)


class _Slow:
  """Metrics whose computation has not finished; records whether they were read."""

  def __init__(self, value):
    self.value, self.ready, self.read = value, False, False

  def is_ready(self):
    return self.ready

  def __array__(self, dtype=None, copy=None):
    self.read = True
    return np.asarray(self.value, dtype)


def test_lines_mode_reports_every_tenth_and_exact_totals():
  stream = io.StringIO()
  bar = progress.Progress(20, 'lines', 'head 1/2', stream, interval=0)
  epoch = _Epoch(20)
  for i in range(20):
    bar.update(epoch.step(loss=2.0 * (i + 1), correct=3.0, count=4.0), epoch.done)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert len(lines) == 10  # at 2, 4, ..., 18 batches, then the final line
  assert lines[0].startswith('head 1/2 2/20 (10%): loss 0.7500 accuracy 0.7500 | ')
  assert all('img/s' in line and 'ETA' in line for line in lines[:-1])
  # 2 * (1 + ... + 20) / 80 and 60 / 80, over every step.
  assert lines[-1].startswith('head 1/2 done 20/20: loss 5.2500 accuracy 0.7500 | ')
  assert 'img/s' in lines[-1]
  assert '\r' not in stream.getvalue()
  assert bar.totals == {'loss': 420.0, 'correct': 60.0, 'count': 80.0}


def test_bar_mode_redraws_one_line_and_ends_with_newline(monkeypatch):
  monkeypatch.setenv('COLUMNS', '200')  # room for the full 30-character bar
  stream = io.StringIO()
  bar = progress.Progress(10, 'bar', 'epoch 1', stream, interval=0)
  epoch = _Epoch(10)
  for _ in range(10):
    bar.update(epoch.step(1.0, 1.0, 2.0), epoch.done)
  bar.close()
  out = stream.getvalue()
  assert out.count('\r') == 11 and out.endswith('\n') and out.count('\n') == 1
  final = out.split('\r')[-1]
  assert final.startswith('epoch 1 [' + '=' * 30 + '] 10/10 loss 0.5000 accuracy 0.5000')
  assert '3/10' in out and 'img/s' in final and 'ETA 0:00' in final


def test_bar_fits_a_narrow_terminal(monkeypatch):
  monkeypatch.setenv('COLUMNS', '50')
  stream = io.StringIO()
  bar = progress.Progress(100, 'bar', 'a long description', stream, interval=0)
  epoch = _Epoch(100)
  for _ in range(37):
    bar.update(epoch.step(1.0, 1.0, 2.0), epoch.done)
  bar.close()
  drawn = stream.getvalue().rstrip('\n').split('\r')[1:]
  assert len(drawn) == 38 and all(len(line) <= 49 for line in drawn)
  assert drawn[-1].startswith('a long description [===>      ] 37/100')


def test_resumed_bar_starts_where_the_epoch_stopped():
  """Resumed after 6 batches: their sums come from the checkpoint, and the rows before
  the 7th (not this session's) are not read."""
  stream = io.StringIO()
  bar = progress.Progress(
      10,
      'lines',
      '',
      stream,
      batches_done=6,
      interval=0,
      start_sums={'loss': 6.0, 'correct': 0.0, 'count': 6.0},
  )
  epoch = _Epoch(10, done=6)
  epoch.rows[:6] = np.nan  # would poison the sums if they were read
  for _ in range(4):
    bar.update(epoch.step(2.0, 2.0, 2.0), epoch.done)
  bar.close()
  lines = stream.getvalue().splitlines()
  assert [line.split(' ')[0] for line in lines] == ['7/10', '8/10', '9/10', 'done']
  assert lines[-1].startswith('done 10/10: loss 1.0000 accuracy 0.5714')


def test_off_mode_writes_nothing():
  stream = io.StringIO()
  bar = progress.Progress(3, 'off', 'x', stream, interval=0)
  epoch = _Epoch(3)
  for _ in range(3):
    bar.update(epoch.step(1.0, 1.0, 1.0), epoch.done)
  bar.close()
  assert stream.getvalue() == '' and not bar.pending


def test_auto_mode_picks_lines_without_a_terminal():
  assert progress.Progress(5, 'auto', stream=io.StringIO()).mode == 'lines'

  class Terminal(io.StringIO):

    def isatty(self):
      return True

  assert progress.Progress(5, 'auto', stream=Terminal()).mode == 'bar'
  with pytest.raises(ValueError, match='progress mode'):
    progress.Progress(5, 'fancy')


def test_metrics_not_computed_are_not_read_until_they_are_or_until_close():
  stream = io.StringIO()
  bar = progress.Progress(4, 'lines', '', stream, interval=0)
  epoch = _Epoch(4)
  bar.update(epoch.step(1.0, 1.0, 1.0), epoch.done)
  slow = _Slow(epoch.step(5.0, 0.0, 1.0))
  bar.update(slow, epoch.done)
  assert bar.pending and bar.completed == 1 and not slow.read
  assert bar.totals == {'loss': 1.0, 'correct': 1.0, 'count': 1.0}
  slow.ready = True
  bar.update(slow, epoch.done)
  assert not bar.pending and bar.completed == 2 and slow.read
  bar.update(epoch.step(1.0, 1.0, 1.0), epoch.done)
  bar.close(epoch.step(1.0, 0.0, 1.0), epoch.done)
  assert stream.getvalue().splitlines()[-1].startswith('done 4/4: loss 2.0000 accuracy 0.5000')


def test_sums_of_consecutive_rows_equal_the_sum_of_all():
  """A resumed epoch adds its rows to the sums saved mid-epoch; the result must be the
  uninterrupted epoch's to the bit (the epoch record is compared across a resume)."""
  # Magnitudes from 1e-10 to 1e10: float64 sums of these are not exact, so the order of
  # the additions shows.
  rng = np.random.default_rng(0)
  rows = (10.0 ** rng.uniform(-10, 10, (1000, 3))).astype(np.float32)
  whole = progress.sum_rows(rows)
  for cut in (1, 333, 999):
    assert progress.sum_rows(rows[cut:], progress.sum_rows(rows[:cut])) == whole
  expected = [0.0, 0.0, 0.0]
  for row in rows:  # left to right in float64, as the sums are defined
    expected = [e + float(v) for e, v in zip(expected, row)]
  assert whole == dict(zip(progress.METRICS, expected))


# --- the summary a run ends with --------------------------------------------------------


@pytest.mark.parametrize(
    'val, test, offered',
    [
        (True, True, '[--split train|val|test]'),
        (True, False, '--split train|val'),  # evaluate's default split, test, is not there
        (False, False, '--split train'),
    ],
)
def test_the_summary_offers_evaluate_the_splits_the_run_has(tmp_path, val, test, offered):
  final = {'checkpoint': 'final parameters', 'step': 4}
  if test:
    final.update(test_loss=0.5, test_accuracy=0.75, test_examples=8)
  if val:
    final.update(val_loss=0.25, val_accuracy=0.5, val_examples=8)
  text = reporting.run_summary(RunDir(tmp_path), {'step': 4, 'epoch': 2, 'final': final})
  [line] = [line for line in text.splitlines() if 'fineflax.evaluate' in line]
  assert line == (
      f'  evaluate: python -m fineflax.evaluate --workdir {tmp_path} {offered} '
      '[--checkpoint best|latest|STEP]'
  )
  assert ('test split, final parameters' in text) == test
