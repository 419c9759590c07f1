"""`tfds:NAME`: any image-classification dataset of tensorflow-datasets.

Split strings are passed as written (`'train[:40%]'`). Offline first: a dataset already
prepared in `config.data.data_dir` is read; otherwise the files it is built from are
taken from `config.data.manual_dir` when they are all there, and downloaded only when
their hosts answer within seconds. If neither, the error names each file, its URL and
checksum and where to put it, at once, instead of tfds' retry loop (over 200 s here).

TensorFlow decodes (tf.data) and is kept off the accelerators. Each process reads its
share of every split (`tfds.split_for_jax_process`); images of varying size are resized
to `config.data.load_size` as they are read, and the split is held in memory as uint8.

Streamed (`fineflax.data.pipeline`), every process reads its rows of one global order of
each split by index: through `tfds.data_source` for a dataset prepared as array_record
files, through an index of the record offsets (`fineflax.data.tfrecord_index`) for one
prepared as tfrecord files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any, Sequence
from urllib.parse import urlparse

import jax
import numpy as np

from fineflax.data import pipeline, stream, tfrecord_index
from fineflax.data.dataset import Dataset, DatasetInfo, Split, StreamSplit, read_split
from fineflax.distributed import once
from fineflax.errors import ConfigError, DataError

logger = logging.getLogger('fineflax.data')

_PROBE_TIMEOUT_S = 3
_SPLITS = ('train_split', 'val_split', 'test_split')


def _tfds():
  """tensorflow_datasets, with TensorFlow kept off every GPU (JAX owns their memory)."""
  # TensorFlow only decodes and resizes here: its C++ start-up lines (CPU features, a
  # failed cuInit on a machine without CUDA) say nothing about the run. oneDNN speeds up
  # none of those ops, and its notice is printed whatever TF_CPP_MIN_LOG_LEVEL says. A
  # value set by the user is kept.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tf, tfds


def _builder(spec: str, data_config: Any):
  name = spec.split(':', 1)[1]
  _, tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_config.data_dir)
  except Exception as e:  # tfds raises DatasetNotFoundError and others
    raise ConfigError(f'config.data.source={spec!r}: {e}') from None


def info(spec: str, data_config: Any) -> DatasetInfo:
  """Image shape (`load_size` for images of varying size) and class names, from tfds."""
  builder = _builder(spec, data_config)
  features = builder.info.features
  for key in ('image', 'label'):
    if key not in features:
      raise ConfigError(
          f'config.data.source={spec!r}: not an image classification dataset '
          f'(features {list(features)})'
      )
  shape = tuple(features['image'].shape)
  if data_config.load_size:
    shape = (data_config.load_size, data_config.load_size, 3)
  elif None in shape[:2]:
    raise ConfigError(
        f'config.data.source={spec!r}: its images vary in size; set '
        'config.data.load_size to the side to resize them to as they are read'
    )
  return DatasetInfo((shape[0], shape[1], 3), tuple(features['label'].names))


def _reachable(url: str) -> str | None:
  """None if the URL's host accepts a connection within seconds, else why not."""
  parsed = urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S).close()
    return None
  except OSError as e:
    return f'{parsed.hostname}: {e}'


def _prepare(builder, spec: str, data_config: Any) -> None:
  """download_and_prepare, from `manual_dir` or the network, or a fast, complete error."""
  _, tfds = _tfds()
  manual_dir = data_config.manual_dir
  infos = dict(builder.url_infos or {})
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  # A file without a name in tfds' record goes by the last part of its URL.
  names = {url: i.filename or PurePosixPath(urlparse(url).path).name for url, i in infos.items()}
  local = bool(manual_dir) and all((Path(manual_dir) / n).exists() for n in names.values())
  problems = [] if local or instructions else [p for p in map(_reachable, infos) if p]
  if problems or (instructions and not local):
    files = '\n'.join(
        f'  {names[url]}  from {url}  (sha256 {i.checksum}, ' f'{i.size:,} bytes)'
        for url, i in infos.items()
    )
    raise DataError(
        f'config.data.source={spec!r}: the dataset is not prepared in '
        f'{builder.data_dir} and cannot be built here'
        + (f' (no network: {problems[0]})' if problems else '')
        + '.\n'
        + (f'Its manual download instructions: {instructions}\n' if instructions else '')
        + (
            f'Put these files into config.data.manual_dir (now {manual_dir}):\n{files}\n'
            if files
            else ''
        )
        + 'or build it where there is network (tfds.builder(...).download_and_prepare() '
        'with the same data_dir) and copy the data_dir folder here.'
    )
  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  builder.download_and_prepare(download_config=config)


def _as_dataset(builder, split: str, spec: str, data_config: Any):
  """The (image, label) tf.data.Dataset of a split, preparing the dataset if needed."""
  _, tfds = _tfds()
  # No tf.data cache: the split is read once, into memory; tfds' cache of a small dataset
  # would hold a second copy, and `take(max_examples)` would leave it partly read (a
  # warning).
  kwargs = dict(
      split=split,
      as_supervised=True,
      shuffle_files=False,
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  try:
    return builder.as_dataset(**kwargs)
  except AssertionError:  # tfds' way of saying "not prepared"
    _prepare(builder, spec, data_config)
    return builder.as_dataset(**kwargs)
  except ValueError as e:  # a malformed split string
    raise ConfigError(f'config.data.source={spec!r}, split {split!r}: {e}') from None


def _prepared_builder(spec: str, data_config: Any, split: str) -> Any:
  """The dataset's builder, the dataset prepared first if it is not (`_prepare`)."""
  builder = _builder(spec, data_config)
  try:
    builder.as_dataset(split=split)
  except AssertionError:  # tfds' way of saying "not prepared"
    _prepare(builder, spec, data_config)
    builder = _builder(spec, data_config)  # with the prepared dataset's info
  except (NotImplementedError, ValueError):
    pass  # prepared, for reading by index only; or a malformed split, said where it is read
  return builder


def _examples(builder, split: str) -> float:
  """The number of examples of `split` of the prepared dataset; infinite when tfds records
  none (tfds.testing.mock_data)."""
  try:
    return builder.info.splits[split].num_examples
  except Exception:  # pylint: disable=broad-except
    return float('inf')


def _read_split(builder, split: str, spec: str, data_config: Any) -> Split:
  tf, tfds = _tfds()
  local = split
  if jax.process_count() > 1:
    if _examples(builder, split) <= jax.process_index():
      # A split of fewer examples than processes: tfds refuses this process's empty share
      # ("corresponds to no data"), but it still takes part in read_split's count.
      return read_split(np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int32))
    local = tfds.split_for_jax_process(split)
  ds = _as_dataset(builder, local, spec, data_config)
  # The split is read into arrays allocated once, at its size (a list of batches
  # concatenated at the end would hold it twice at the peak): tfds counts the examples of
  # any split it is given ('train[:90%]', a process's share of it).
  try:
    count = builder.info.splits[local].num_examples
  except Exception:  # pylint: disable=broad-except
    # No count recorded (tfds.testing.mock_data's splits have none): the arrays grow. The
    # count only sizes an allocation; the examples read are what counts.
    count = None
  if data_config.max_examples:
    # Shares that add up to max_examples (the first processes take one more).
    quotient, remainder = divmod(data_config.max_examples, jax.process_count())
    take = quotient + (jax.process_index() < remainder)
    ds = ds.take(take)
    count = take if count is None else min(count, take)
  size = data_config.load_size

  def decode(image, label):
    if size:
      image = tf.cast(tf.round(tf.image.resize(image, (size, size))), tf.uint8)
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    return image, tf.cast(label, tf.int32)

  def grown(array: np.ndarray | None, rows: int, like: np.ndarray) -> np.ndarray:
    """An array of `rows` rows shaped as `like`'s, holding the `filled` rows of `array`."""
    out = np.empty((rows, *like.shape[1:]), like.dtype)
    if array is not None:
      out[:filled] = array[:filled]
    return out

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  images: np.ndarray | None = None
  labels: np.ndarray | None = None
  filled = 0
  try:
    for x, y in ds.batch(1024).prefetch(2).as_numpy_iterator():
      if images is not None and x.shape[1:] != images.shape[1:]:
        raise DataError(
            f'config.data.source={spec!r}, split {split!r}: images of several '
            f'sizes {images.shape[1:]} and {x.shape[1:]}; set '
            'config.data.load_size'
        )
      if images is None or filled + len(x) > len(images):
        # Once, at the count; only without one (or a wrong one) again, doubling.
        rows = max(count or 0, filled + len(x), 2 * filled)
        images, labels = grown(images, rows, x), grown(labels, rows, y)
      images[filled : filled + len(x)] = x
      labels[filled : filled + len(x)] = y
      filled += len(x)
  except tf.errors.InvalidArgumentError as e:  # images of several sizes cannot be batched
    raise DataError(
        f'config.data.source={spec!r}, split {split!r}: images of several '
        f'sizes; set config.data.load_size ({str(e)[:200]})'
    ) from None
  if images is None:
    return read_split(np.zeros((0, 1, 1, 3), np.uint8), np.zeros((0,), np.int32))
  # A view of the rows read: rows beyond them (a count too high, or grown) were never
  # written to, and hold no memory.
  return read_split(images[:filled], labels[:filled])


@dataclasses.dataclass(frozen=True)
class TfdsRecords:
  """Random access to a tfds split (its `tfds.data_source`, picklable for grain's
  workers): `read(i)` -> (RGB image, label), the first `limit` examples."""

  source: Any
  name_: str
  limit: int

  def __len__(self) -> int:
    return self.limit

  def name(self, index: int) -> str:
    return f'{self.name_}[{index}]'

  def read(self, index: int) -> tuple[Any, int]:
    from PIL import Image  # pylint: disable=g-import-not-at-top

    example = self.source[index]
    image = np.asarray(example['image'])
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert('RGB'), int(
        example['label']
    )


ARRAY_RECORD = 'array_record'
TFRECORD = 'tfrecord'


def _file_format(builder) -> str:
  return str(getattr(builder.info.file_format, 'value', builder.info.file_format))


def _data_sources(
    builder, data_config: Any, keys: Sequence[str]
) -> tuple[dict[str, Any] | None, str | None]:
  """({split key: random-access data source}, None), or (None, why there is none). tfds
  reads datasets prepared as array_record (or parquet) files by index; one prepared as
  tfrecord files is read by index here (`fineflax.data.tfrecord_index`), its key mapped to
  None until it is indexed (`_index_tfrecords`), which only a streamed run needs."""
  sources = {}
  for key in keys:
    try:
      sources[key] = builder.as_data_source(split=data_config[key])
    except (NotImplementedError, ValueError):  # tfds' own advice lists other options
      file_format = _file_format(builder)
      if file_format != TFRECORD:
        return None, (
            f'prepared as {file_format} files, which are read in order only; '
            f'streaming needs {ARRAY_RECORD} or {TFRECORD} files '
            f"(download_and_prepare(file_format='{ARRAY_RECORD}'))"
        )
      sources[key] = None
  return sources, None


def _split_info(builder, spec: str, split: str) -> Any:
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError, AssertionError) as e:  # a malformed or unknown split
    raise ConfigError(f'config.data.source={spec!r}, split {split!r}: {e}') from None


def _source_examples(builder, spec: str, split: str, source: Any, data_config: Any) -> int:
  """The number of examples of a split a streamed run reads (`max_examples` at most)."""
  count = len(source) if source is not None else _split_info(builder, spec, split).num_examples
  return min(count, data_config.max_examples or count)


def _index_tfrecords(
    builder, spec: str, data_config: Any, sources: dict[str, Any]
) -> dict[str, Any]:
  """`sources` with each split prepared as tfrecord files (None) indexed (the first
  `max_examples` of it), the time it took logged."""
  start = time.perf_counter()
  indexed = dict(sources)
  files = 0
  for key, source in sources.items():
    if source is not None:
      continue
    split = data_config[key]
    # Paths in the dataset's folder (tfds gives them whole; older versions by name only).
    instructions = [
        i
        if os.path.isabs(str(i.filename))
        else dataclasses.replace(i, filename=os.path.join(builder.data_dir, i.filename))
        for i in _split_info(builder, spec, split).file_instructions
    ]
    indexed[key] = tfrecord_index.index_split(
        instructions, builder.info.features, data_config.max_examples or None
    )
    files += len(indexed[key].files)
  records = sum(len(indexed[k]) for k, s in sources.items() if s is None)
  if files:
    logger.info(
        '%s: indexed %d records of %d %s files in %.2f s (reading their headers: '
        'a streamed split is read by index)',
        spec,
        records,
        files,
        TFRECORD,
        time.perf_counter() - start,
    )
  return indexed


def _stream_split(source: Any, spec: str, split: str, data_config: Any, side: int) -> StreamSplit:
  """A split streamed from its data source, delivered at `side` x `side`."""
  limit = min(len(source), data_config.max_examples or len(source))
  workers = data_config.workers
  return StreamSplit(
      TfdsRecords(source, f'{spec}:{split}', limit),
      None,
      side,
      crop=data_config.augment.crop
      if data_config.augment.crop == pipeline.RANDOM_RESIZED
      else None,
      workers=stream.default_workers() if workers is None else workers,
  )


def load(spec: str, data_config: Any, keys: Sequence[str] = _SPLITS) -> Dataset:
  """This process's share of each split of `keys` the config names: read into memory, or
  streamed (`fineflax.data.pipeline`; datasets prepared as array_record or tfrecord
  files)."""
  wanted = [k for k in _SPLITS if data_config[k] and k in keys]
  # With several processes and one data_dir, process 0 prepares while the others wait.
  builder = once.process_zero_first(
      f'preparing {spec}',
      lambda: _prepared_builder(spec, data_config, data_config[(wanted or _SPLITS)[0]]),
  )
  dataset_info = info(spec, data_config)
  sources, cannot = _data_sources(builder, data_config, wanted)
  # tfds reads array_record files by index only (as_dataset refuses them).
  only = (
      f'prepared as {ARRAY_RECORD} files, read by index only'
      if sources is not None and _file_format(builder) == ARRAY_RECORD
      else None
  )
  height, width, _ = dataset_info.image_shape
  count = sum(
      _source_examples(builder, spec, data_config[k], s, data_config)
      for k, s in (sources or {}).items()
  )
  if pipeline.streams(data_config, count * height * width * 3, cannot, only):
    if height != width:
      raise ConfigError(
          f'config.data.source={spec!r} is streamed (see the line above): '
          'set config.data.load_size, the side images are delivered at'
      )
    sources = _index_tfrecords(builder, spec, data_config, sources)
    splits = {
        data_config[k]: _stream_split(sources[k], spec, data_config[k], data_config, height)
        for k in wanted
    }
    return Dataset(dataset_info, splits)
  splits = {data_config[k]: _read_split(builder, data_config[k], spec, data_config) for k in wanted}
  return Dataset(dataset_info, splits)
