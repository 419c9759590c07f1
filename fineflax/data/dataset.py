"""Datasets of uint8 images held in memory, and the batches cut from them.

Every process holds a disjoint share of each split (`share`); a global batch is the
concatenation of one local batch per process. Batches are drawn as indices into the
share: the host gathers the images (`gather`), or the step gathers them on the device
from a split placed there whole (`fineflax.data.feed`). Training sees every example
once an epoch; evaluation visits every example exactly once, with weight-0 padding that
every metric masks out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from fineflax.errors import ConfigError

Batch = dict[str, np.ndarray]  # 'index' int32 and 'weight' float32; gathered: 'image', 'label'


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
  """This process's share of a split: (n, H, W, 3) uint8 RGB images, (n,) int32 labels.

  The counts are over every process and count the examples that were read: `size` the
  whole split, `largest_share` the largest process's share (what sizes an epoch, so that
  no process runs out of batches before the others), `skipped` the files of the split that
  could not be read. With one process they default to the share's own. A split of cached
  features (`fineflax.train.features`) holds (n, D) float vectors instead of images.
  """

  images: np.ndarray
  labels: np.ndarray
  size: int = -1
  largest_share: int = -1
  skipped: int = 0

  def __post_init__(self):
    is_image = (
        self.images.dtype == np.uint8 and self.images.ndim == 4 and self.images.shape[-1] == 3
    )
    is_feature = self.images.dtype != np.uint8 and self.images.ndim == 2
    if not (is_image or is_feature):
      raise ValueError(
          f'images must be (N, H, W, 3) uint8 (or (N, D) features), got '
          f'{self.images.shape} {self.images.dtype}'
      )
    if self.labels.shape != (len(self.images),):
      raise ValueError(f'{len(self.images)} images but labels of shape {self.labels.shape}')
    if self.size < 0:
      object.__setattr__(self, 'size', len(self.labels))
    if self.largest_share < 0:
      object.__setattr__(
          self, 'largest_share', max(len(self.labels), -(-self.size // jax.process_count()))
      )

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def nbytes(self) -> int:
    return self.images.nbytes + self.labels.nbytes


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """A split read from its files batch by batch while training runs (`fineflax.data.stream`).

  Every process can read every example (`records`: random access by index, `read(i)` ->
  (RGB image, label)), so an epoch is one global order of all `size` examples and each
  process reads its rows of every global batch. `labels` holds every example's label when
  the source lists them without reading the images (a folder's), else None (a tfds
  split's come with each example). `image_size` is the side of the images the host
  delivers, `crop` the host's training crop ('random_resized', or None: a plain resize),
  `workers` the number of decoding processes (0: threads of this one), `draft` whether a
  training crop of a JPEG may be decoded at a reduced scale (`fineflax.data.stream`).
  `unreadable`: the examples whose file this process found unreadable so far (streaming
  finds them as it reads them; `fineflax.data.stream.read_batches` adds them).
  """

  records: Any
  labels: np.ndarray | None
  image_size: int
  crop: str | None = None
  workers: int = 0
  draft: bool = False
  unreadable: set[int] = dataclasses.field(
      default_factory=set, compare=False, hash=False, repr=False
  )

  def __len__(self) -> int:
    return len(self.records)

  @property
  def size(self) -> int:
    return len(self.records)

  @property
  def largest_share(self) -> int:
    return -(-self.size // jax.process_count())

  @property
  def skipped(self) -> int:
    """The unreadable files this process has found so far."""
    return len(self.unreadable)

  @property
  def nbytes(self) -> int:
    return self.size * self.image_size**2 * 3  # decoded, were it held in memory


AnySplit = Split | StreamSplit


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Named splits plus the class names (index = label); `absent`: split names the config
  gives that the source looked for and may do without (a photo folder without test/)."""

  info: DatasetInfo
  splits: Mapping[str, Split]
  absent: tuple[str, ...] = ()


def share(num_examples: int) -> np.ndarray:
  """The indices of a split's examples that this process reads (every P-th one)."""
  return np.arange(jax.process_index(), num_examples, jax.process_count())


def shared_split(images: np.ndarray, labels: np.ndarray) -> Split:
  """This process's share of a split held whole on every process."""
  idx = share(len(labels))
  return Split(
      images[idx],
      labels.astype(np.int32)[idx],
      size=len(labels),
      largest_share=-(-len(labels) // jax.process_count()),
  )


def read_split(images: np.ndarray, labels: np.ndarray, skipped: int = 0) -> Split:
  """The Split of the share this process read, its counts summed over every process.

  Every process must call it, in the same order: with several processes it gathers each
  one's number of examples read and of files skipped, and the image shape. A process that
  read no example (fewer examples than processes) takes another's image shape: its rows
  of every batch, all padding, must be shaped as theirs.
  """
  counts = np.asarray([len(labels), skipped, *images.shape[1:]], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(counts))
    readers = counts[counts[:, 0] > 0]
    if not len(labels) and len(readers):
      images = np.zeros((0, *readers[0, 2:]), images.dtype)
  else:
    counts = counts[None]
  return Split(
      images,
      labels.astype(np.int32),
      size=int(counts[:, 0].sum()),
      largest_share=int(counts[:, 0].max()),
      skipped=int(counts[:, 1].sum()),
  )


def num_batches(split: AnySplit, global_batch: int) -> int:
  """Batches an epoch takes, the same on every process (the largest share decides)."""
  local_batch = global_batch // jax.process_count()
  return -(-split.largest_share // local_batch)


def _padded(index: np.ndarray, local_batch: int, filler: np.ndarray) -> Batch:
  weight = np.zeros(local_batch, np.float32)
  weight[: len(index)] = 1
  index = np.concatenate([index, filler[: local_batch - len(index)]]).astype(np.int32)
  return {'index': index, 'weight': weight}


def _own_rows(batch: Batch) -> Batch:
  """This process's rows of a global batch."""
  rows = len(batch['index']) // jax.process_count()
  start = jax.process_index() * rows
  return {k: v[start : start + rows] for k, v in batch.items()}


def host_crop_key(rng: np.random.Generator) -> np.ndarray:
  """The key of the host's random crops in the epoch whose order `rng` draws: derived
  from its seed without drawing from it (spawning leaves the stream as it is, so the order
  stays that of an in-memory split)."""
  return rng.bit_generator.seed_seq.spawn(1)[0].generate_state(2)


def train_batches(split: AnySplit, global_batch: int, rng: np.random.Generator) -> Iterator[Batch]:
  """One epoch of local index batches in a random order; every example is seen once.

  The last batches are filled up with other randomly chosen examples of weight 0: they
  take no part in the loss or the metrics, and, unlike zero padding, they do not distort
  the batch statistics of training-mode BatchNormalization. A streamed split is ordered
  globally (the same draws as one process's in-memory split): every process computes the
  global batches and keeps its rows, so any number of processes trains on the same ones.
  """
  streamed = isinstance(split, StreamSplit)
  batch = global_batch if streamed else global_batch // jax.process_count()
  crop_key = host_crop_key(rng) if streamed else None
  order = rng.permutation(len(split))
  for i in range(num_batches(split, global_batch)):
    index = order[i * batch : (i + 1) * batch]
    padded = _padded(index, batch, rng.integers(0, max(len(split), 1), batch))
    yield dict(_own_rows(padded), crop_key=crop_key) if streamed else padded


def epoch_plan(split: Split, global_batch: int, rng: np.random.Generator) -> Batch:
  """`train_batches` of one epoch stacked: 'index' and 'weight' of shape (batches, local
  batch), row i the i-th batch; the same draws from `rng`."""
  batches = list(train_batches(split, global_batch, rng))
  return {key: np.stack([b[key] for b in batches]) for key in ('index', 'weight')}


def eval_batches(split: AnySplit, global_batch: int) -> Iterator[Batch]:
  """The split in order; padding rows (weight 0) repeat example 0, nothing is dropped."""
  streamed = isinstance(split, StreamSplit)
  batch = global_batch if streamed else global_batch // jax.process_count()
  order = np.arange(len(split))
  for i in range(num_batches(split, global_batch)):
    padded = _padded(order[i * batch : (i + 1) * batch], batch, np.zeros(batch, np.int64))
    yield _own_rows(padded) if streamed else padded


def gather(split: Split, batch: Batch) -> Batch:
  """The images and labels of an index batch, gathered on the host.

  A process's empty share (fewer examples than processes) has no example for its padding
  rows to repeat: they are zeros, of weight 0 like all of its rows."""
  if not len(split):
    rows = len(batch['index'])
    return {
        'image': np.zeros((rows, *split.images.shape[1:]), split.images.dtype),
        'label': np.zeros(rows, split.labels.dtype),
        'weight': batch['weight'],
    }
  return {
      'image': split.images[batch['index']],
      'label': split.labels[batch['index']],
      'weight': batch['weight'],
  }


def class_weights(spec: Any, split: AnySplit, num_classes: int) -> tuple[float, ...] | None:
  """`config.loss.class_weight` as one weight per class ('balanced': Keras' and
  scikit-learn's n_examples / (n_classes * n_examples_of_the_class), from the train split
  over every process)."""
  if spec is None:
    return None
  if spec != 'balanced':
    if len(spec) != num_classes:
      raise ConfigError(
          f'config.loss.class_weight has {len(spec)} weights but the dataset has '
          f'{num_classes} classes'
      )
    return tuple(float(w) for w in spec)
  if split.labels is None:
    raise ConfigError(
        "config.loss.class_weight='balanced' counts the train split's labels, "
        'which a streamed tfds split does not list before reading its images; '
        'give one weight per class'
    )
  counts = np.bincount(split.labels, minlength=num_classes).astype(np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  if (counts == 0).any():
    raise ConfigError(
        "config.loss.class_weight='balanced': the train split has no example of "
        f'class {int(np.argmin(counts))}'
    )
  return tuple(float(w) for w in counts.sum() / (num_classes * counts))
