"""In-memory datasets of uint8 images and the host-side batches cut from them."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import numpy as np

Batch = dict[str, np.ndarray]  # 'image' uint8 (B, H, W, 3), 'label' int32, 'weight' float32


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset before loading it."""

  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: (N, H, W, 3) uint8 RGB images and (N,) int32 labels."""

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f'images must be (N, H, W, 3) uint8, got {self.images.shape} '
                       f'{self.images.dtype}')
    if self.labels.shape != (len(self.images),):
      raise ValueError(f'{len(self.images)} images but labels of shape {self.labels.shape}')

  def __len__(self) -> int:
    return len(self.labels)

  def head(self, n: int | None) -> 'Split':
    """The first n examples (all of them for None)."""
    return self if n is None else Split(self.images[:n], self.labels[:n])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Named splits plus the class names (index = label)."""

  info: DatasetInfo
  splits: Mapping[str, Split]


def num_batches(num_examples: int, batch_size: int) -> int:
  return -(-num_examples // batch_size)


def train_batches(split: Split, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
  """One epoch in a random order; every example is seen once.

  The last batch is filled up with other randomly chosen examples of weight 0: they take
  no part in the loss or the metrics, and, unlike zero padding, they do not distort the
  batch statistics of training-mode BatchNormalization.
  """
  n = len(split)
  order = rng.permutation(n)
  for start in range(0, n, batch_size):
    idx = order[start:start + batch_size]
    weight = np.ones(batch_size, np.float32)
    if len(idx) < batch_size:
      weight[len(idx):] = 0
      idx = np.concatenate([idx, rng.choice(n, batch_size - len(idx))])
    yield {'image': split.images[idx], 'label': split.labels[idx], 'weight': weight}


def eval_batches(split: Split, batch_size: int) -> Iterator[Batch]:
  """The split in order; the last batch is padded with weight-0 zeros, nothing is dropped."""
  n = len(split)
  for start in range(0, n, batch_size):
    images = split.images[start:start + batch_size]
    labels = split.labels[start:start + batch_size]
    weight = np.ones(batch_size, np.float32)
    pad = batch_size - len(labels)
    if pad:
      weight[len(labels):] = 0
      images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
    yield {'image': images, 'label': labels, 'weight': weight}
