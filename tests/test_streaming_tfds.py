"""Streaming a tfds dataset prepared as tfrecord files (tfds' default;
fineflax.data.tfrecord_index): every example read by index equals tf.data's read of the
same position, a streamed run equals an in-memory one and evaluates every example once,
and a damaged shard is named in one line."""

import gc
import json
import logging
import multiprocessing
import pickle
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from fineflax import config as config_lib, data, train
from fineflax.data import tfrecord_index
from fineflax.data.dataset import Split, StreamSplit
from fineflax.errors import DataError
from fineflax.run import restore
from fineflax.run.reporting import MetricsLog
from tests import multiprocess_job

pytestmark = pytest.mark.slow  # trains runs

NAME = multiprocess_job.TINY_TFDS


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The tiny tfds dataset (9 train examples, 1 test) prepared as tfrecord files, train in
  8 shards, one of them of 2 examples (so a slice can begin inside a shard)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.utils import shard_utils  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp('tfds_tfrecord')
  multiprocess_job.tiny_tfds(str(data_dir), prepare=False)
  # tfds computes the number of shards in a classmethod that reads the class's default
  # minimum shard size (64 MB), not DownloadConfig(min_shard_size=...); and num_shards
  # would apply to the 1-example test split too.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(shard_utils.ShardConfig, 'min_shard_size', 1)
    tfds.builder(NAME, data_dir=str(data_dir)).download_and_prepare()
  builder = tfds.builder(NAME, data_dir=str(data_dir))
  assert str(builder.info.file_format.value) == 'tfrecord'
  assert builder.info.splits['train'].shard_lengths == [1, 1, 1, 1, 2, 1, 1, 1]
  return data_dir


def _builder(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.builder(NAME, data_dir=str(data_dir))


def _tf_data(data_dir, split):
  """The reference: the split read in order by tf.data, as (image, label) pairs."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  dataset = _builder(data_dir).as_dataset(split=split, shuffle_files=False)
  return [(x['image'], int(x['label'])) for x in tfds.as_numpy(dataset)]


def _config(data_dir, pipeline='stream', **data_keys):
  cfg = config_lib.default_config()
  cfg.batch_size = 4
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  cfg.data.source = f'tfds:{NAME}'
  cfg.data.data_dir = str(data_dir)
  cfg.data.val_split = None
  cfg.data.pipeline = pipeline
  cfg.data.workers = 0
  for key, value in data_keys.items():
    cfg.data[key] = value
  cfg.phases = (config_lib.phase(name='a', batchnorm='train', epochs=2),)
  return cfg


def _load(cfg):
  return data.load_dataset(config_lib.validate(cfg).data)


@pytest.mark.parametrize('split', ['train', 'train[:40%]', 'train[5:]', 'test'])
def test_every_record_read_by_index_equals_tf_data_in_order(tiny, split, monkeypatch):
  """Each example by index, in a shuffled order and after a pickle round trip (grain's
  workers get the source so; the original's files closed), from one thread and from
  four, two files open a thread, equals tf.data's example at that position."""
  monkeypatch.setattr(tfrecord_index, '_OPEN_FILES', 2)
  builder = _builder(tiny)
  instructions = builder.info.splits[split].file_instructions
  if split == 'train[5:]':
    assert instructions[0].skip == 1  # the slice begins inside the 2-example shard
  original = tfrecord_index.index_split(instructions, builder.info.features)
  original[len(original) - 1]  # opens a file: the copy must open its own
  source = pickle.loads(pickle.dumps(original))
  del original  # closes its files
  gc.collect()
  reference = _tf_data(tiny, split)
  assert len(source) == len(reference)
  order = [int(i) for i in np.random.default_rng(0).permutation(len(reference))] * 3
  with ThreadPoolExecutor(4) as threads:
    for read in (
        list(map(source.__getitem__, order)),
        list(threads.map(source.__getitem__, order)),
    ):
      for i, example in zip(order, read, strict=True):
        np.testing.assert_array_equal(example['image'], reference[i][0])
        assert int(example['label']) == reference[i][1]


def test_a_streamed_split_holds_the_first_max_examples_of_a_slice(tiny, caplog):
  """`load` streams a slice split's first `max_examples` examples (those of tf.data's
  read), says so, and logs the indexing once."""
  with caplog.at_level(logging.INFO, logger='fineflax.data'):
    dataset = _load(_config(tiny, train_split='train[1:]', max_examples=5))
  assert 'data pipeline: stream (config.data.pipeline=' in caplog.text
  lines = [r.getMessage() for r in caplog.records if 'indexed' in r.getMessage()]
  # train[1:] to 5 examples: shards 1-4 (1, 1, 1, 2 examples); test: 1 in 1.
  assert len(lines) == 1 and re.fullmatch(
      rf'tfds:{NAME}: indexed 6 records of 5 tfrecord files in [0-9.]+ s .*', lines[0]
  )
  split = dataset.splits['train[1:]']
  assert isinstance(split, StreamSplit) and len(split) == 5
  reference = _tf_data(tiny, 'train[1:]')[:5]
  for i, (image, label) in enumerate(reference):
    read, read_label = split.records.read(i)
    np.testing.assert_array_equal(np.asarray(read), image)
    assert read_label == label
  assert len(dataset.splits['test']) == 1


def test_a_tfrecord_dataset_streams_as_asked_and_stays_in_memory_when_small(tiny):
  """'stream' and a random-resized crop stream it (they were refused before it could be
  read by index); 'auto' keeps a small one in memory."""
  assert isinstance(_load(_config(tiny, 'stream')).splits['train'], StreamSplit)
  cfg = _config(tiny, 'auto', load_size=8)
  cfg.data.augment.crop = 'random_resized'
  assert isinstance(_load(cfg).splits['train'], StreamSplit)
  assert isinstance(_load(_config(tiny, 'auto')).splits['train'], Split)


def test_a_streamed_run_equals_the_in_memory_run_and_evaluates_every_example_once(tiny, tmp_path):
  """The same run streamed from the tfrecord files (a worker process reads them) and read
  into memory by tf.data: the same losses and parameters; the test slice (7 examples over
  6 shards, its last batch padded) is evaluated once per example. The run's decoding
  process (started once, for every epoch and evaluation) has ended with it."""
  devices = jax.devices()[:2]
  for name, pipeline, workers in (('memory', 'memory', 0), ('stream', 'stream', 1)):
    train.train_and_evaluate(
        _config(tiny, pipeline, test_split='train[2:]', workers=workers),
        tmp_path / name,
        devices=devices,
    )
  gc.collect()
  assert not [p for p in multiprocessing.active_children() if p.name.startswith('fineflax-')]
  streamed, in_memory = (MetricsLog(tmp_path / n).read() for n in ('stream', 'memory'))
  assert streamed and [r['loss'] for r in streamed] == [r['loss'] for r in in_memory]
  leaves = [
      jax.tree.leaves(restore.load_run(tmp_path / n, 'latest').variables)
      for n in ('stream', 'memory')
  ]
  for a, b in zip(*leaves, strict=True):
    np.testing.assert_array_equal(a, b)
  finals = [
      json.loads((tmp_path / n / 'results.json').read_text())['final'] for n in ('stream', 'memory')
  ]
  assert finals[0]['test_examples'] == 7
  assert finals[0] == finals[1]


def _shards(data_dir, split='train'):
  return [str(i.filename) for i in _builder(data_dir).info.splits[split].file_instructions]


def _damaged_load(data_dir, pattern):
  with pytest.raises(DataError) as caught:
    _load(_config(data_dir))
  message = str(caught.value)
  assert '\n' not in message and re.fullmatch(pattern, message), message


def test_a_truncated_or_corrupted_shard_is_named_in_one_line(tiny, tmp_path):
  """Indexing stops at a shard cut short, a header that fails its CRC, or a shard with
  more records than tfds lists; reading a record whose data fails its CRC is an error
  naming the file (which the streaming path counts as one unreadable example)."""
  copy = tmp_path / 'tfds'
  shutil.copytree(tiny, copy)
  shard = _shards(copy)[4]  # 2 records
  original = open(shard, 'rb').read()
  second = 12 + int.from_bytes(original[:8], 'little') + 4  # where record 1 begins

  open(shard, 'wb').write(original[:-3])
  _damaged_load(
      copy,
      rf'{re.escape(shard)}: truncated: record 1 at byte {second} ends at '
      rf'byte {len(original)}, past the end of the file \({len(original) - 3} '
      r'bytes\)',
  )
  open(shard, 'wb').write(original[:second])
  _damaged_load(
      copy,
      rf'{re.escape(shard)}: truncated: it ends at byte {second} after 1 '
      r'records, fewer than the 2 tfds lists',
  )
  damaged = bytearray(original)
  damaged[second + 2] ^= 0xFF  # the length of record 1
  open(shard, 'wb').write(bytes(damaged))
  _damaged_load(
      copy,
      rf'{re.escape(shard)}: not a tfrecord file, or corrupted: the header '
      rf'of record 1 at byte {second} fails its CRC',
  )
  open(shard, 'wb').write(original + original[second:])
  _damaged_load(
      copy,
      rf'{re.escape(shard)}: holds more than the 2 records tfds lists '
      rf'\(they end at byte {len(original)} of {len(original) * 2 - second}\)',
  )

  open(shard, 'wb').write(original)
  damaged = bytearray(original)
  damaged[second + 12 + 5] ^= 0xFF  # a byte of record 1's data
  open(shard, 'wb').write(bytes(damaged))
  records = _load(_config(copy)).splits['train'].records
  records.read(4)  # record 0 of the shard is sound
  with pytest.raises(
      DataError,
      match=rf'^{re.escape(shard)}: the record at byte {second} ' r'fails its CRC \(corrupted\)$',
  ):
    records.read(5)


def test_a_format_read_in_order_only_is_refused_in_one_line():
  """A dataset prepared in a format neither tfds nor fineflax reads by index (riegeli):
  the reason the pipeline gives when 'stream' is asked for."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  from fineflax.data import tfds_source  # pylint: disable=g-import-not-at-top

  def as_data_source(split):
    raise NotImplementedError(split)

  builder = SimpleNamespace(
      as_data_source=as_data_source, info=SimpleNamespace(file_format='riegeli')
  )
  assert tfds_source._data_sources(builder, {'train_split': 'train'}, ['train_split']) == (  # pylint: disable=protected-access
      None,
      'prepared as riegeli files, which are read in order only; streaming needs '
      "array_record or tfrecord files (download_and_prepare(file_format='array_record'))",
  )
