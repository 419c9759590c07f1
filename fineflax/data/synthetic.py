"""Random uint8 images of a given size, for benchmarks: `config.data.source = 'synthetic:N:SIDE'`.

N training images of SIDE x SIDE (default 32, CIFAR's), 10 classes, with validation and
test splits of N // 10 each. The pixels and labels come from a fixed seed: what a timing
needs is the real input pipeline on data of the right shape, not the content.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from fineflax.data.dataset import Dataset, DatasetInfo, shared_split
from fineflax.errors import ConfigError

CLASSES = tuple(f'class_{i}' for i in range(10))


def _parse(spec: str) -> tuple[int, int]:
  parts = spec.split(':')[1:]
  try:
    n, side = int(parts[0]), int(parts[1]) if len(parts) > 1 else 32
  except (IndexError, ValueError):
    raise ConfigError(
        f"config.data.source={spec!r}: expected 'synthetic:N' or "
        "'synthetic:N:SIDE' (N images of SIDE x SIDE)"
    ) from None
  if n < 1 or side < 1:
    raise ConfigError(f'config.data.source={spec!r}: N and SIDE must be >= 1')
  return n, side


def info(spec: str, data_config: Any) -> DatasetInfo:
  """The image shape and the 10 class names."""
  del data_config
  _, side = _parse(spec)
  return DatasetInfo(image_shape=(side, side, 3), class_names=CLASSES)


def load(
    spec: str, data_config: Any, keys: Sequence[str] = ('train_split', 'val_split', 'test_split')
) -> Dataset:
  """This process's share of 'train' (N), 'validation' and 'test' (N // 10 each), whatever
  `keys` asks for: all three cost less than choosing."""
  del keys
  n, side = _parse(spec)
  rng = np.random.default_rng(0)
  splits = {}
  for name, size in (('train', n), ('validation', max(1, n // 10)), ('test', max(1, n // 10))):
    size = min(size, data_config.max_examples or size)
    images = rng.integers(0, 256, (size, side, side, 3), dtype=np.uint8)
    splits[name] = shared_split(images, rng.integers(0, len(CLASSES), size).astype(np.int32))
  return Dataset(info(spec, data_config), splits)
