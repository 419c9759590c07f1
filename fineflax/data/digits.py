"""scikit-learn's digits: 1,797 real 8x8 handwritten digits that ship with the package.

The offline demo's data. The 16 grey levels become uint8 RGB; the split into train (70%),
validation (15%) and test (15%) is stratified and fixed, whatever `config.seed` is, so
every run is evaluated on the same test images.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fineflax.data.dataset import Dataset, DatasetInfo, shared_split

_SPLIT_SEED = 0
_FRACTIONS = {'train': 0.70, 'validation': 0.15}
INFO = DatasetInfo(image_shape=(8, 8, 3), class_names=tuple(str(d) for d in range(10)))


def info(spec: str, data_config: Any) -> DatasetInfo:
  """The digits' image shape and class names (no loading needed)."""
  del spec, data_config
  return INFO


def load(
    spec: str, data_config: Any, keys: Sequence[str] = ('train_split', 'val_split', 'test_split')
) -> Dataset:
  """This process's share of 'train', 'validation' and 'test' (first `max_examples` each),
  whatever `keys` asks for: all three cost less than choosing."""
  del spec, keys
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
  images = np.repeat(grey[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  rng = np.random.default_rng(_SPLIT_SEED)
  parts: dict[str, list[np.ndarray]] = {'train': [], 'validation': [], 'test': []}
  for label in range(10):
    idx = rng.permutation(np.flatnonzero(labels == label))
    n_train = round(len(idx) * _FRACTIONS['train'])
    n_val = round(len(idx) * _FRACTIONS['validation'])
    parts['train'].append(idx[:n_train])
    parts['validation'].append(idx[n_train : n_train + n_val])
    parts['test'].append(idx[n_train + n_val :])
  splits = {}
  for name, chunks in parts.items():
    idx = rng.permutation(np.concatenate(chunks))[: data_config.max_examples]
    splits[name] = shared_split(images[idx], labels[idx])
  return Dataset(INFO, splits)
