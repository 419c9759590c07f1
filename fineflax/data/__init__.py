"""Data sources. `config.data.source` is 'NAME' or 'NAME:ARGUMENT'; NAME keys `SOURCES`."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from fineflax.data import digits
from fineflax.data.dataset import (Batch, Dataset, DatasetInfo, Split, eval_batches,
                                   num_batches, train_batches)


class Source(NamedTuple):
  """A data source: `info(spec)` without loading, `load(spec)` the whole dataset."""

  info: Callable[[str], DatasetInfo]
  load: Callable[[str], Dataset]


SOURCES: dict[str, Source] = {
    'digits': Source(digits.info, digits.load),
}


def _source(spec: str) -> Source:
  name = spec.split(':', 1)[0]
  if name not in SOURCES:
    raise ValueError(f'config.data.source={spec!r}: unknown source {name!r}; '
                     f'available: {sorted(SOURCES)}')
  return SOURCES[name]


def dataset_info(data_config: Any) -> DatasetInfo:
  """Image shape and class names of `config.data`'s dataset."""
  return _source(data_config.source).info(data_config.source)


def load_dataset(data_config: Any) -> Dataset:
  """Loads `config.data`'s dataset, keeping `max_examples` of each split when set."""
  dataset = _source(data_config.source).load(data_config.source)
  splits = {name: split.head(data_config.max_examples) for name, split in dataset.splits.items()}
  return Dataset(dataset.info, splits)


__all__ = ['Batch', 'Dataset', 'DatasetInfo', 'SOURCES', 'Source', 'Split', 'dataset_info',
           'eval_batches', 'load_dataset', 'num_batches', 'train_batches']
