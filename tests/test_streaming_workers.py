"""The streaming path's decoding processes (fineflax.data.decoders) and its reduced-scale
JPEG decode (`draft`): processes started once a split, across epochs and evaluation
passes, delivering what grain's threads deliver, stopped when the split is dropped; a
drafted training crop within a stated tolerance of the full decode, and never drafted
when the crop would then be enlarged; a large shrink of a training crop reduced first
(Pillow's reducing_gap) within a stated tolerance of PIL's plain resize, and evaluation
crops exact."""

import gc
import multiprocessing
import os
import signal

import numpy as np
import pytest
from PIL import Image

from fineflax import data
from fineflax.data import decoders, stream
from fineflax.data.dataset import StreamSplit


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """24 JPEGs of 40 x 30 and 30 x 40 px."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(0)
  paths = []
  for i in range(24):
    shape = (30, 40, 3) if i % 2 else (40, 30, 3)
    paths.append(str(root / f'{i:02d}.jpg'))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(paths[-1])
  return tuple(paths)


def _split(files, workers):
  labels = np.arange(len(files), dtype=np.int32) % 3
  return StreamSplit(
      stream.FileRecords(files, labels), labels, 16, 'random_resized', workers=workers, draft=True
  )


def _passes(split):
  """Three epochs, an evaluation pass, a pass abandoned after one batch, then a training
  pass and an evaluation pass read in turn."""
  read = []
  for epoch in range(3):
    read += stream.read_batches(
        split, data.train_batches(split, 8, np.random.default_rng([0, 0, epoch]))
    )
  read += stream.read_batches(split, data.eval_batches(split, 8))
  read.append(
      next(stream.read_batches(split, data.train_batches(split, 8, np.random.default_rng(9))))
  )
  train = stream.read_batches(split, data.train_batches(split, 8, np.random.default_rng(9)))
  evaluation = stream.read_batches(split, data.eval_batches(split, 8))
  for a, b in zip(train, evaluation):
    read += [a, b]
  return read


def _decoders():
  return [p for p in multiprocessing.active_children() if p.name.startswith('fineflax-decode')]


def test_processes_serve_every_pass_of_a_split_and_stop_with_it(files):
  """Two processes deliver the batches grain's threads deliver, in order, through
  epochs, evaluation passes, an abandoned pass and two passes read in turn; the same two
  processes serve them all, and once the split is dropped they have ended and their
  shared memory is gone."""
  expected = _passes(_split(files, 0))
  split = _split(files, 2)
  got = _passes(split)
  assert len(got) == len(expected) == 3 * 3 + 3 + 1 + 2 * 3
  for a, b in zip(got, expected, strict=True):
    assert sorted(a) == sorted(b) == ['image', 'label', 'weight']
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  pool = decoders._pools[id(split)]
  started = [p.pid for p in pool._procs]
  assert len(started) == 2 and sorted(p.pid for p in _decoders()) == sorted(started)
  assert not pool._answers and not pool._dropped  # nothing kept for a pass after its end
  slots = [s.name for worker in pool._slots for s in worker if s is not None]
  assert slots and all(os.path.exists(f'/dev/shm/{name}') for name in slots)
  del split, pool
  gc.collect()
  assert not _decoders() and not decoders._pools
  assert not any(os.path.exists(f'/dev/shm/{name}') for name in slots)


class _Failing(stream.FileRecords):

  def read(self, index):
    raise ValueError(f'example {index} fails here')


def test_a_worker_error_is_raised_here_and_a_dead_worker_is_replaced(files):
  labels = np.zeros(len(files), np.int32)
  failing = StreamSplit(_Failing(files, labels), labels, 16, None, workers=1)
  with pytest.raises(ValueError, match='example 0 fails here') as raised:
    list(stream.read_batches(failing, data.eval_batches(failing, 8)))
  assert 'in decoding process' in raised.value.__notes__[0]

  split = _split(files, 1)
  first = next(stream.read_batches(split, data.eval_batches(split, 8)))
  os.kill(decoders._pools[id(split)]._procs[0].pid, signal.SIGKILL)
  with pytest.raises(RuntimeError, match=r'decoding process \d+ ended \(exit code -9\)'):
    list(stream.read_batches(split, data.eval_batches(split, 8)))
  again = next(stream.read_batches(split, data.eval_batches(split, 8)))
  np.testing.assert_array_equal(again['image'], first['image'])
  decoders.close_workers()
  assert not _decoders()


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  """A 1600 x 1200 JPEG like a photo: smooth colour fields and sensor noise."""
  y, x = np.mgrid[0:1200, 0:1600] / 100.0
  fields = np.stack([np.sin(x + y), np.cos(0.7 * x - 1.3 * y), np.sin(0.03 * x * y)], -1)
  noise = np.random.default_rng(0).normal(0, 12, fields.shape)
  path = tmp_path_factory.mktemp('photo') / 'photo.jpg'
  Image.fromarray(np.clip(fields * 80 + 128 + noise, 0, 255).astype(np.uint8)).save(
      path, quality=90
  )
  return str(path)


def _full_decode(path, box, size=224):
  """The reference: the whole file decoded, cropped to `box` and resized by PIL."""
  return np.asarray(
      Image.open(path).convert('RGB').resize((size, size), Image.Resampling.BILINEAR, box=box),
      np.uint8,
  ).astype(int)


def test_a_drafted_crop_is_within_one_and_a_half_levels_of_the_full_decode(photo):
  """Over 40 random-resized boxes of the photo at 224 px: the mean absolute difference
  to the full decode is at most 1.5 of 255 levels for each (measured 0.4-1.2, at most
  10 levels at a pixel), and most boxes are drafted (at 1/2 or 1/4)."""
  scales = []
  for seed in range(40):
    box = stream.random_resized_box(1600, 1200, np.random.default_rng(seed))
    scales.append(stream.draft_scale(1600, 1200, box, 224))
    got = stream.decode_crop(photo, 224, lambda w, h, box=box: box, draft=True)
    assert np.abs(got.astype(int) - _full_decode(photo, box)).mean() <= 1.5, box
  assert sum(s > 1 for s in scales) >= 30 and set(scales) >= {2, 4}


def test_a_crop_that_a_reduced_decode_would_enlarge_is_decoded_whole(photo):
  """A box under twice the output on a side is decoded at full scale (bit for bit the
  reference without draft, and with it below 2 x REDUCING_GAP times the output); from
  twice the output on both sides it is drafted. Every scale chosen leaves the box at
  least the output's size, and is the largest that does (up to 8)."""
  for box in ((0, 0, 300, 300), (100, 50, 547, 1000), (0, 0, 1600, 447)):
    assert stream.draft_scale(1600, 1200, box, 224) == 1
    got = stream.decode_crop(photo, 224, lambda w, h, box=box: box, draft=False)
    np.testing.assert_array_equal(got, _full_decode(photo, box))
  got = stream.decode_crop(photo, 224, lambda w, h: (0, 0, 300, 300), draft=True)
  np.testing.assert_array_equal(got, _full_decode(photo, (0, 0, 300, 300)))
  box = (10, 20, 458, 468)  # 448 x 448: half of it is the output's size
  assert stream.draft_scale(1600, 1200, box, 224) == 2
  drafted = stream.decode_crop(photo, 224, lambda w, h: box, draft=True)
  assert not np.array_equal(drafted, _full_decode(photo, box))
  rng = np.random.default_rng(0)
  for _ in range(500):
    size = int(rng.integers(8, 300))
    box = stream.random_resized_box(1600, 1200, rng)
    scale = stream.draft_scale(1600, 1200, box, size)
    sides = (box[2] - box[0]) / scale, (box[3] - box[1]) / scale
    assert min(sides) >= size and (scale == 8 or min(sides) / 2 < size)


@pytest.fixture(scope='module')
def png(photo, tmp_path_factory):
  """The photo as a PNG: no reduced decode, so the resize does all the shrinking."""
  path = tmp_path_factory.mktemp('png') / 'photo.png'
  Image.open(photo).save(path)
  return str(path)


def test_a_large_shrink_is_reduced_first_within_half_a_level_and_evaluation_is_exact(png):
  """Over 40 random-resized boxes of the 1600 x 1200 PNG at 224 px, with draft: PIL's
  plain full decode, crop and antialiased resize is the reference; each box is within
  0.5 of 255 levels of it on average and 3 at any pixel (measured 0.19 over the boxes, at
  most 0.36 a box and 2 a pixel), and the reduction is used: a box whose longer side is
  at least 2 x REDUCING_GAP times the output (Pillow then reduces by 2 or more) differs
  from it, a smaller one equals it, and at least 15 of the 40 are reduced. Without draft,
  and for the evaluation crop, the pixels are the reference's, bit for bit."""
  reduced = 0
  for seed in range(40):
    box = stream.random_resized_box(1600, 1200, np.random.default_rng(seed))
    ref = _full_decode(png, box)
    got = stream.decode_crop(png, 224, lambda w, h, box=box: box, draft=True).astype(int)
    diff = np.abs(got - ref)
    assert diff.mean() <= 0.5 and diff.max() <= 3, (box, diff.mean(), diff.max())
    over = max(box[2] - box[0], box[3] - box[1]) >= 2 * stream.REDUCING_GAP * 224
    assert diff.any() == over, box  # reduced exactly where Pillow's gap says
    reduced += over
    exact = stream.decode_crop(png, 224, lambda w, h, box=box: box, draft=False)
    np.testing.assert_array_equal(exact, ref)
  assert reduced >= 15
  split = StreamSplit(
      stream.FileRecords((png,), np.zeros(1, np.int32)),
      np.zeros(1, np.int32),
      224,
      'random_resized',
      workers=0,
      draft=True,
  )
  evaluation = stream.read_examples(split, [0])[0][0]
  np.testing.assert_array_equal(evaluation, _full_decode(png, stream.centre_box(1600, 1200)))
