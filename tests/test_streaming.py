"""The streaming input path (`config.data.pipeline='stream'`, fineflax.data.stream): the
same batches as the in-memory path, Inception-style crops by their formula, unreadable
files skipped, exact evaluation, a mid-epoch resume equal to an uninterrupted run, and the
pipeline chosen (and said) as configured."""

import json
import logging
import math

import jax
import numpy as np
import pytest
from PIL import Image

from fineflax import config as config_lib, data, train
from fineflax.data import stream
from fineflax.distributed import preemption
from fineflax.errors import ConfigError
from fineflax.run import restore
from fineflax.run.reporting import MetricsLog
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """A folder of 3 classes x 14 JPEGs of several sizes (none square at 16 px)."""
  root = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for c in range(3):
    folder = root / f'class{c}'
    folder.mkdir()
    for i in range(14):
      pixels = rng.integers(0, 90, (18 + i % 4, 21 + i % 3, 3)) + 70 * c
      Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i:02d}.jpg')
  return root


def _config(photos, pipeline='stream', **data_keys):
  cfg = helpers.tiny_config(
      config_lib.phase(name='a', batchnorm='train', learning_rate=3e-3, epochs=2),
      source=f'folder:{photos}',
      load_size=16,
      validation_split=0.25,
      test_split=None,
      pipeline=pipeline,
      workers=0,
      **data_keys,
  )
  cfg.model.preprocessing = 'auto'  # the backbone's own
  cfg.model.head.dropout = 0.3
  cfg.data.augment.flip = 'horizontal'
  return cfg


def _leaves(workdir):
  return jax.tree.leaves(restore.load_run(workdir, 'latest').variables)


def test_a_streamed_run_trains_on_the_same_batches_as_an_in_memory_one(photos, tmp_path):
  """With a plain resize the host delivers the in-memory path's pixels, and one process
  orders a streamed split as it orders one in memory: the runs agree bit for bit (grain's
  threads decode here; test_streaming_tfds.py compares a run whose decoding process
  reads the files)."""
  devices = jax.devices()[:2]
  for name in ('memory', 'stream'):
    train.train_and_evaluate(_config(photos, name), tmp_path / name, devices=devices)
  expected, got = (MetricsLog(tmp_path / name).read() for name in ('memory', 'stream'))
  assert [(r['loss'], r['val_loss']) for r in got] == [(r['loss'], r['val_loss']) for r in expected]
  for a, b in zip(_leaves(tmp_path / 'stream'), _leaves(tmp_path / 'memory'), strict=True):
    np.testing.assert_array_equal(a, b)


def test_random_resized_boxes_follow_their_formula():
  """Area a share of the image's in [0.08, 1], width/height in [3/4, 4/3], inside the image;
  the draws cover the range (not one fixed box) and come from the generator given."""
  boxes = [stream.random_resized_box(120, 80, np.random.default_rng(i)) for i in range(400)]
  shares, ratios = [], []
  for left, top, right, bottom in boxes:
    assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
    w, h = right - left, bottom - top
    shares.append(w * h / (120 * 80))
    ratios.append(w / h)
  assert min(shares) >= 0.08 * 0.95 and max(shares) <= 1  # rounding to whole pixels
  assert min(ratios) >= 3 / 4 * 0.95 and max(ratios) <= 4 / 3 * 1.05
  assert min(shares) < 0.2 and max(shares) > 0.8 and len(set(boxes)) > 300
  assert stream.random_resized_box(120, 80, np.random.default_rng(7)) == boxes[7]
  # A sliver of an image (aspect 10) fits no draw: the centred crop of the widest aspect.
  assert stream.random_resized_box(1000, 100, np.random.default_rng(0)) == (
      500 - 67,
      0,
      500 - 67 + 133,
      100,
  )


def test_the_evaluation_crop_is_the_centred_square_of_seven_eighths():
  image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 64, 3)).astype(np.uint8))
  got = stream.host_image(image, 14, 'random_resized', train=False)
  side = 0.875 * 40  # of the shorter side, centred
  box = ((64 - side) / 2, (40 - side) / 2, (64 + side) / 2, (40 + side) / 2)
  expected = np.asarray(
      image.crop(tuple(map(round, box))).resize((14, 14), Image.Resampling.BILINEAR), np.uint8
  )
  assert box == (14.5, 2.5, 49.5, 37.5)  # half pixels: PIL's box resize takes them as is
  # The reference crops whole pixels (15..50 x 2..38, the box rounded to even): a shift
  # of half a pixel, so neighbouring pixels differ by up to their gradient.
  np.testing.assert_allclose(got.astype(int), expected.astype(int), atol=255)
  exact = np.asarray(image.resize((14, 14), Image.Resampling.BILINEAR, box=box), np.uint8)
  np.testing.assert_array_equal(got, exact)


def test_host_crops_differ_between_epochs_and_repeat_for_the_same_seed(photos):
  cfg = _config(photos)
  cfg.data.augment.crop = 'random_resized'
  cfg = config_lib.validate(cfg)
  split = data.load_dataset(cfg.data).splits['train']
  assert isinstance(split, data.StreamSplit)

  def first_batch(epoch):
    rng = np.random.default_rng([0, 0, epoch])
    batch = next(data.train_batches(split, 8, rng))
    return next(stream.read_batches(split, [batch]))

  a, again, b = first_batch(0), first_batch(0), first_batch(1)
  np.testing.assert_array_equal(a['image'], again['image'])
  assert not np.array_equal(a['image'], b['image'])
  # The same example in two epochs is cropped differently.
  key0 = data.dataset.host_crop_key(np.random.default_rng([0, 0, 0]))
  key1 = data.dataset.host_crop_key(np.random.default_rng([0, 0, 1]))
  assert not np.array_equal(
      stream.read_examples(split, [3], key0)[0], stream.read_examples(split, [3], key1)[0]
  )


def test_unreadable_files_are_skipped_named_once_and_evaluation_counts_the_rest(
    photos, tmp_path, caplog
):
  broken = tmp_path / 'photos'
  broken.mkdir()
  for folder in photos.iterdir():
    (broken / folder.name).mkdir()
    for f in folder.iterdir():
      (broken / folder.name / f.name).write_bytes(f.read_bytes())
  (broken / 'class1' / '03.jpg').write_bytes(b'not a jpeg')
  (broken / 'class2' / '00.jpg').write_bytes(b'')
  cfg = _config(broken)
  cfg.data.validation_split = 0.0
  cfg.data.val_split = None
  with caplog.at_level(logging.WARNING, logger='fineflax'):
    results = train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:8])
  named = [r.getMessage() for r in caplog.records if 'not a readable image' in r.getMessage()]
  assert sorted(named) == sorted(
      f'{broken}/{p}: not a readable image; it is skipped (its ' 'rows count nothing)'
      for p in ('class1/03.jpg', 'class2/00.jpg')
  )
  records = MetricsLog(tmp_path / 'run').read()
  assert all(np.isfinite(r['loss']) for r in records)
  # Evaluation of the train split: 42 files, 2 unreadable, each other example once.
  from fineflax.inference import evaluate  # pylint: disable=g-import-not-at-top

  report = evaluate.evaluate_run(tmp_path / 'run', split='train')
  assert report['examples'] == 40 and results['step'] == 2 * math.ceil(42 / 8)
  # The epochs have the batches of the 42 files listed (in memory: of the 40 read); the
  # difference is said once found, and dataset.json counts the files skipped.
  said = [r.getMessage() for r in caplog.records if 'while streaming' in r.getMessage()]
  assert said == [
      "split 'train' (train): 2 file(s) found unreadable while streaming (named "
      'above): their rows train and count nothing, so 40 of its 42 listed '
      'examples count (the in-memory pipeline would leave them out before '
      'training); dataset.json updated'
  ]
  recorded = json.loads((tmp_path / 'run' / 'dataset.json').read_text())['splits']['train']
  assert recorded == {'name': 'train', 'examples': 42, 'skipped_files': 2}


@pytest.mark.parametrize('unreadable', [False, True])
def test_a_streamed_head_phase_trains_on_cached_features_as_in_memory(
    photos, tmp_path, caplog, unreadable
):
  """A head phase on a frozen backbone without augmentation caches the features of a
  streamed split as of one in memory (which crashed: the cache rebuilt the split as an
  in-memory one), and trains to the same bits: the host resize delivers the in-memory
  pixels. An unreadable file is left out of the features, as the in-memory pipeline
  leaves it out of its split."""
  source = photos
  if unreadable:
    source = tmp_path / 'photos'
    for folder in photos.iterdir():
      (source / folder.name).mkdir(parents=True)
      for f in folder.iterdir():
        (source / folder.name / f.name).write_bytes(f.read_bytes())
    (source / 'class1' / '03.jpg').write_bytes(b'not a jpeg')
  runs = {}
  for pipeline in ('memory', 'stream'):
    cfg = _config(source, pipeline)
    cfg.data.augment.flip = 'none'
    cfg.phases = (config_lib.phase(name='head', freeze='backbone', epochs=2),)
    with caplog.at_level(logging.INFO, logger='fineflax.train'):
      caplog.clear()
      train.train_and_evaluate(cfg, tmp_path / pipeline, devices=jax.devices()[:1])
    assert any('trains the head on cached features' in r.getMessage() for r in caplog.records)
    runs[pipeline] = [
        {k: v for k, v in r.items() if k != 'images_per_sec'}
        for r in MetricsLog(tmp_path / pipeline).read()
    ]
  assert runs['stream'] == runs['memory']
  for a, b in zip(_leaves(tmp_path / 'stream'), _leaves(tmp_path / 'memory'), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_streamed_folder_without_load_size_takes_the_models_size(photos, tmp_path, caplog):
  """`config.data.load_size` None on a streamed folder: the images are delivered at the
  model's input size (config.model.image_size), said in the log and recorded in
  config.json, where evaluation reads it."""
  cfg = _config(photos)
  cfg.data.load_size = None
  cfg.phases = (config_lib.phase(name='a', epochs=1),)
  with caplog.at_level(logging.INFO, logger='fineflax.data'):
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:1])
  assert (
      'config.data.load_size is None: streamed images are delivered at 16 px, the '
      "model's input size"
  ) in caplog.text
  saved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert saved['data']['load_size'] == 16
  assert json.loads((tmp_path / 'run' / 'dataset.json').read_text())['image_shape'] == [16, 16, 3]
  from fineflax.inference import evaluate  # pylint: disable=g-import-not-at-top

  assert evaluate.evaluate_run(tmp_path / 'run', split='validation')['examples'] == 10
  # The same command again resumes (the recorded load_size is the one it resolves to).
  train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:1])


def test_streamed_evaluation_counts_every_example_once(photos):
  """13 examples, a global batch of 8 on 8 devices and of 5 (padded to the device count
  where the code asks it): the weights add up to the split, each index once."""
  cfg = config_lib.validate(_config(photos, max_examples=13))
  split = data.load_dataset(cfg.data, ('train_split',)).splits['train']
  for batch_size in (8, 16):
    seen = np.concatenate(
        [b['index'][b['weight'] > 0] for b in data.eval_batches(split, batch_size)]
    )
    assert sorted(seen) == list(range(13))
    images = list(stream.read_batches(split, data.eval_batches(split, batch_size)))
    assert sum(b['weight'].sum() for b in images) == 13
    assert all(b['image'].shape == (batch_size, 16, 16, 3) for b in images)


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_parameters(
    photos, tmp_path, monkeypatch
):
  """Stopped (as by SIGTERM) in the second epoch, the run resumes at that batch, without
  reading the epoch's earlier batches again, and ends bit-identical to a run never
  stopped (host crops and device augmentation keyed the same after the resume)."""
  cfg = _config(photos)
  cfg.data.augment.crop = 'random_resized'
  devices = jax.devices()[:2]
  train.train_and_evaluate(cfg, tmp_path / 'whole', devices=devices)

  stop_at = 6  # 4 batches an epoch: the second batch of epoch 2
  monkeypatch.setattr(preemption.StopRequest, 'at', lambda self, step: step == stop_at)
  with pytest.raises(preemption.Preempted):
    train.train_and_evaluate(cfg, tmp_path / 'cut', devices=devices)
  monkeypatch.undo()
  read = []
  original = stream.BatchReader.__call__
  monkeypatch.setattr(
      stream.BatchReader,
      '__call__',
      lambda self, batch: read.append(batch) or original(self, batch),
  )
  train.train_and_evaluate(cfg, tmp_path / 'cut', devices=devices)
  train_batches = [b for b in read if 'crop_key' in b]
  assert len(train_batches) == 1 + (4 - 2)  # the compile's sample batch, then the rest
  for a, b in zip(_leaves(tmp_path / 'cut'), _leaves(tmp_path / 'whole'), strict=True):
    np.testing.assert_array_equal(a, b)


def test_the_pipeline_is_chosen_as_configured_and_said(photos, caplog):
  with caplog.at_level(logging.INFO, logger='fineflax.data'):
    auto = data.load_dataset(config_lib.validate(_config(photos, 'auto')).data)
    small = config_lib.validate(_config(photos, 'auto', memory_max_mb=0))
    streamed = data.load_dataset(small.data)
  assert isinstance(auto.splits['train'], data.Split)
  assert isinstance(streamed.splits['train'], data.StreamSplit)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('data pipe')]
  assert lines[0] == 'data pipeline: memory (0.0 MB decoded <= config.data.memory_max_mb=16384)'
  assert lines[1] == 'data pipeline: stream (0 MB decoded > config.data.memory_max_mb=0)'

  refused = [
      (
          dict(pipeline='stream', source='digits'),
          "config.data.pipeline='stream': config.data.source='digits': digits sources are read "
          'into memory only',
      ),
      (
          dict(pipeline='memory', crop='random_resized'),
          "config.data.augment.crop='random_resized' crops the original images as they are "
          "streamed: set config.data.pipeline='stream' or 'auto'",
      ),
      (
          dict(pipeline='stream', load_size=None),
          'is streamed \\(see the line above\\): set config.data.load_size',
      ),
  ]
  for change, message in refused:
    cfg = _config(photos, change.pop('pipeline'))
    if 'crop' in change:
      cfg.data.augment.crop = change.pop('crop')
    for key, value in change.items():
      cfg.data[key] = value
    with pytest.raises(
        ConfigError,
        match=message.replace('(', '\\(').replace(')', '\\)')
        if 'see the line' not in message
        else message,
    ):
      data.load_dataset(config_lib.validate(cfg).data)


def test_predict_reads_files_as_the_streamed_evaluation_does(photos, tmp_path):
  """A run whose host cropped the originals: `predict` crops each file's centre as its
  evaluation did, so its probabilities are the model's on the evaluation's pixels."""
  from fineflax.inference import arrays, predict  # pylint: disable=g-import-not-at-top

  cfg = _config(photos)
  cfg.data.augment.crop = 'random_resized'
  cfg.phases = (config_lib.phase(name='a', epochs=1),)
  train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:1])
  split = data.load_dataset(config_lib.validate(cfg).data).splits['validation']
  files = list(split.records.files[:3])
  ranked = predict.predict_run_files(
      tmp_path / 'run', files, k=3, checkpoint='latest', devices=jax.devices()[:1]
  )
  run = restore.load_run(tmp_path / 'run', 'latest')
  probs = np.asarray(arrays.predict_fn(run)(stream.read_examples(split, range(3))[0]))
  for top, p in zip(ranked, probs, strict=True):
    assert [name for name, _ in top] == [run.class_names[i] for i in np.argsort(-p)]
    np.testing.assert_allclose([q for _, q in top], np.sort(p)[::-1], rtol=1e-5)
  # The originals as arrays (not square, not the stored shape) get the same centre crop.
  originals = [np.asarray(Image.open(f).convert('RGB')) for f in files]
  assert all(a.shape[:2] != (16, 16) for a in originals)
  # Log-probabilities: a trained model's top class saturates at 1, the others do not.
  np.testing.assert_allclose(
      np.log(np.asarray(arrays.predict_fn(run)(originals))), np.log(probs), rtol=1e-4, atol=1e-4
  )


def test_a_tfds_dataset_streams_when_prepared_as_array_record(tmp_path, caplog):
  """A tfds dataset prepared as array_record files (read by index only) streams through
  its data source, on the batches and pixels of the same examples read into memory from
  tfrecord files (the images need no resize); prepared as tfrecord files (tfds' default),
  a small split is read into memory under 'auto' (tests/test_streaming_tfds.py streams
  such files)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from tests import multiprocess_job  # pylint: disable=g-import-not-at-top

  multiprocess_job.tiny_tfds(str(tmp_path / 'tfrecord'), prepare=True)
  tfds.builder(
      multiprocess_job.TINY_TFDS, data_dir=str(tmp_path / 'array_record')
  ).download_and_prepare(file_format='array_record')

  def config(data_dir, pipeline):
    cfg = config_lib.default_config()
    cfg.batch_size = 4
    cfg.model.backbone = 'resnet_tiny'
    cfg.model.preprocessing = 'tf'
    cfg.data.source = f'tfds:{multiprocess_job.TINY_TFDS}'
    cfg.data.data_dir = str(tmp_path / data_dir)
    cfg.data.val_split = None
    cfg.data.pipeline = pipeline
    cfg.data.workers = 0
    cfg.phases = (config_lib.phase(name='a', batchnorm='train', epochs=2),)
    return cfg

  with caplog.at_level(logging.INFO, logger='fineflax.data'):
    data.load_dataset(config_lib.validate(config('tfrecord', 'auto')).data)
  assert 'data pipeline: memory (' in caplog.text and 'MB decoded <=' in caplog.text

  with pytest.raises(
      ConfigError,
      match=r"^config.data.pipeline='memory': .*: prepared as "
      r'array_record files, read by index only: set config.data.pipeline=',
  ):
    data.load_dataset(config_lib.validate(config('array_record', 'memory')).data)
  devices = jax.devices()[:2]
  # The same examples prepared in the two formats: in memory from tfrecord, streamed
  # from array_record.
  for name, data_dir, pipeline in (
      ('memory', 'tfrecord', 'memory'),
      ('stream', 'array_record', 'auto'),
  ):
    train.train_and_evaluate(config(data_dir, pipeline), tmp_path / name, devices=devices)
  streamed, in_memory = (MetricsLog(tmp_path / n).read() for n in ('stream', 'memory'))
  assert [r['loss'] for r in streamed] == [r['loss'] for r in in_memory]
  for a, b in zip(_leaves(tmp_path / 'stream'), _leaves(tmp_path / 'memory'), strict=True):
    np.testing.assert_array_equal(a, b)
  results = json.loads((tmp_path / 'stream' / 'results.json').read_text())
  assert results['final']['test_examples'] == 1
