"""Data sources. `config.data.source` is 'NAME' or 'NAME:ARGUMENT'; NAME keys `SOURCES`.

A source gives `info(spec, config.data)` (image shape, class names) without loading, and
`load(spec, config.data)`: this process's share of each split, uint8 RGB images of one
size (`config.data.load_size` for photos of varying sizes) with int32 labels.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from fineflax.config import registry
from fineflax.data import digits, folder, pipeline, synthetic, tfds_source
from fineflax.data.augment import FILL_MODES, FLIPS, Augment
from fineflax.data.dataset import (
    AnySplit,
    Batch,
    Dataset,
    DatasetInfo,
    Split,
    StreamSplit,
    class_weights,
    epoch_plan,
    eval_batches,
    gather,
    num_batches,
    read_split,
    share,
    shared_split,
    train_batches,
)
from fineflax.errors import ConfigError

logger = logging.getLogger('fineflax.data')


class Source(NamedTuple):
  """A data source: `info(spec, data_config)` without loading, and
  `load(spec, data_config, keys)`: the splits of the config keys `keys` ('train_split',
  'val_split', 'test_split') that the config names."""

  info: Callable[[str, Any], DatasetInfo]
  load: Callable[[str, Any, Sequence[str]], Dataset]


SPLIT_KEYS = ('train_split', 'val_split', 'test_split')
STREAMED_SOURCES = ('folder', 'tfds')  # those whose load() chooses the pipeline itself


SOURCES: dict[str, Source] = {
    'digits': Source(digits.info, digits.load),
    'folder': Source(folder.info, folder.load),
    'synthetic': Source(synthetic.info, synthetic.load),
    'tfds': Source(tfds_source.info, tfds_source.load),
}


def _check_source(spec: str) -> str | None:
  name, _, arg = spec.partition(':')
  if name not in SOURCES:
    return f'unknown source {name!r}; expected one of {sorted(SOURCES)}'
  argument = {'tfds': 'NAME', 'folder': 'PATH', 'synthetic': 'N:SIDE'}
  if name in argument and not arg:
    return f"expected '{name}:{argument[name]}'"
  return None


registry.register_check('data.source', _check_source)
registry.register_choices('data.augment.flip', FLIPS)
registry.register_choices('data.augment.fill_mode', FILL_MODES)
registry.register_choices('data.pipeline', pipeline.PIPELINES)


def _source(spec: str) -> Source:
  name = spec.split(':', 1)[0]
  if name not in SOURCES:
    raise ConfigError(
        f'config.data.source={spec!r}: unknown source {name!r}; ' f'available: {sorted(SOURCES)}'
    )
  return SOURCES[name]


def dataset_info(data_config: Any) -> DatasetInfo:
  """Image shape and class names of `config.data`'s dataset."""
  return _source(data_config.source).info(data_config.source, data_config)


def load_dataset(
    data_config: Any, keys: Sequence[str] = SPLIT_KEYS, stream_size: int | None = None
) -> Dataset:
  """Loads this process's share of `config.data`'s splits (those of `keys` only, e.g.
  ('test_split',): the others are not decoded) and logs their class counts.

  `stream_size`: the side a streamed photo folder is delivered at when
  `config.data.load_size` is None (the model's input size); without it such a folder
  needs load_size.
  """
  name = data_config.source.split(':', 1)[0]
  if name not in STREAMED_SOURCES:  # says so; refuses 'stream'
    pipeline.streams(data_config, 0, f'{name} sources are read into memory only')
  if name == 'folder':
    dataset = folder.load(data_config.source, data_config, tuple(keys), stream_size)
  else:
    dataset = _source(data_config.source).load(data_config.source, data_config, tuple(keys))
  for name, split in dataset.splits.items():
    skipped = f', {split.skipped} unreadable file(s) skipped' if split.skipped else ''
    if split.labels is None:  # a streamed tfds split: its labels come with its images
      logger.info('split %r: %d examples (streamed)', name, split.size)
      continue
    counts = np.bincount(split.labels, minlength=dataset.info.num_classes)
    per_class = ', '.join(f'{c}: {n}' for c, n in zip(dataset.info.class_names, counts))
    logger.info(
        'split %r: %d examples%s (this process: %d; %s)',
        name,
        split.size,
        skipped,
        len(split),
        per_class,
    )
  return dataset


def augment_from_config(data_config: Any) -> Augment:
  """The `Augment` of `config.data.augment`."""
  return Augment(**dict(data_config.augment))


__all__ = [
    'AnySplit',
    'Augment',
    'Batch',
    'Dataset',
    'DatasetInfo',
    'SOURCES',
    'SPLIT_KEYS',
    'STREAMED_SOURCES',
    'Source',
    'Split',
    'StreamSplit',
    'augment_from_config',
    'class_weights',
    'dataset_info',
    'epoch_plan',
    'eval_batches',
    'gather',
    'load_dataset',
    'num_batches',
    'read_split',
    'share',
    'shared_split',
    'train_batches',
]
