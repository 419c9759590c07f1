"""Streaming input on grain: splits decoded batch by batch while training runs.

A streamed split (`StreamSplit`) keeps only its records (file names and labels, or a
tfds random-access data source: `fineflax.data.tfds_source.TfdsRecords`) in memory. The
index batches of `fineflax.data.train_batches` / `eval_batches` (one global order; each
process its rows) become image batches: each batch read, cropped and resized by one
call (`BatchReader`), in the split's `workers` decoding processes
(`fineflax.data.decoders`: started at its first read, they serve every epoch and
evaluation pass) or, with `workers` = 0, in grain's threads, prefetched in order. A pass
reads only the index batches it is given: an epoch resumed at batch k reads nothing
before it.

What the host does to each image, to `image_size` x `image_size`:
  crop None: the resize of the in-memory path (`read_image(path, load_size)`), so a
    streamed run sees the same pixels as an in-memory one; the on-device augmentation
    and resize follow in both.
  crop 'random_resized': training takes an Inception-style crop of the original image
    (area 8-100 %, aspect 3/4-4/3) keyed by (seed, phase, epoch, example); evaluation the
    centred square of `EVAL_CROP_FRACTION` of the shorter side. With `draft` (the
    default, `config.data.jpeg_draft`), a training crop of a JPEG is decoded at 1/2, 1/4
    or 1/8 scale when the crop stays at least `image_size` on each side (`draft_scale`):
    the resize still only shrinks it; a crop of a file still over `REDUCING_GAP` times
    the output on a side is first shrunk by an integer factor with a box filter (Pillow's
    `reducing_gap`: non-JPEG files, crops too thin to draft). Within about one level of
    255 of the full decode and resize (tests/test_streaming_workers.py).
    Evaluation decodes the whole file and resizes it exactly, as `predict` does.

An unreadable file found while streaming is named once in the log and its row trains and
counts nothing (weight 0); another example's pixels stand in for it, so training-mode
BatchNorm statistics see a real image.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fineflax.data import decoders
from fineflax.data.dataset import Batch, StreamSplit
from fineflax.data.images import open_rgb
from fineflax.errors import DataError

logger = logging.getLogger('fineflax.data')

EVAL_CROP_FRACTION = 0.875  # Inception's (and timm's) evaluation crop
CROP_SCALE = (0.08, 1.0)  # the crop's share of the image's area
CROP_RATIO = (3 / 4, 4 / 3)  # the crop's width / height
REDUCING_GAP = 2.0  # with draft: Pillow's integer box pre-shrink above this ratio
_STAND_INS = 8  # other examples tried in place of an unreadable one
_PREFETCH_BATCHES = 4  # per worker: decoded batches waiting for the devices
Box = tuple[float, float, float, float]  # (left, top, right, bottom)


@dataclasses.dataclass(frozen=True)
class FileRecords:
  """Random access to a split's image files and labels (picklable: the worker processes
  get it)."""

  files: tuple[str, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.files)

  def name(self, index: int) -> str:
    return self.files[index]

  def read(self, index: int) -> tuple[Any, int]:
    """The RGB PIL image of example `index` and its label; DataError when unreadable."""
    return open_rgb(self.files[index]), int(self.labels[index])


def random_resized_box(
    width: int, height: int, rng: np.random.Generator
) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of an Inception-style random crop: its area a uniform
  share `CROP_SCALE` of the image's, its aspect log-uniform in `CROP_RATIO`; after 10
  draws that do not fit, the largest centred crop whose aspect is within `CROP_RATIO`."""
  area = width * height
  log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
  for _ in range(10):
    target = area * rng.uniform(*CROP_SCALE)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  aspect = width / height
  if aspect < CROP_RATIO[0]:
    w, h = width, round(width / CROP_RATIO[0])
  elif aspect > CROP_RATIO[1]:
    w, h = round(height * CROP_RATIO[1]), height
  else:
    w, h = width, height
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def centre_box(width: int, height: int) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of the centred square of `EVAL_CROP_FRACTION` of the
  shorter side."""
  side = EVAL_CROP_FRACTION * min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  return left, top, left + side, top + side


def host_image(
    image: Any, size: int, crop: str | None, train: bool, rng: np.random.Generator | None = None
) -> np.ndarray:
  """`image` (RGB PIL) as the host delivers it: (size, size, 3) uint8 (module docstring)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  box = None
  if crop == 'random_resized':
    box = random_resized_box(*image.size, rng) if train else centre_box(*image.size)
  if box is not None or image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(image, np.uint8)


def draft_scale(width: int, height: int, box: Box, size: int) -> int:
  """The JPEG decode scale (1, 2, 4 or 8: each side divided by it) at which `box` of a
  `width` x `height` image is still at least `size` px on each side, so that the resize
  to `size` only shrinks it; 1: the whole resolution."""
  box_width, box_height = box[2] - box[0], box[3] - box[1]
  for scale in (8, 4, 2):
    if box_width / scale >= size and box_height / scale >= size:
      return scale
  return 1


def decode_crop(path: str, size: int, box_of: Callable[[int, int], Box], draft: bool) -> np.ndarray:
  """The image file `path` cropped to `box_of(width, height)` and resized to size x size
  (bilinear, antialiased): (size, size, 3) uint8. With `draft`, a JPEG is decoded at
  `draft_scale` (libjpeg's scaled IDCT) and the box scaled with it, and the resize takes
  `REDUCING_GAP`; without, the pixels are PIL's full decode, crop and resize.

  Raises:
    DataError: the file is missing or not a readable image (named in the message).
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      width, height = image.size
      box = box_of(width, height)
      scale = draft_scale(width, height, box, size) if draft and image.format == 'JPEG' else 1
      if scale > 1:
        # PIL takes the largest of 8, 4, 2 that leaves the image this large.
        image.draft('RGB', (width // scale, height // scale))
        scale = round(width / image.size[0])  # pixel i of the scaled image: [i*s, (i+1)*s)
        box = tuple(v / scale for v in box)
      image.load()
      rgb = image if image.mode == 'RGB' else image.convert('RGB')  # convert would copy
      return np.asarray(
          rgb.resize(
              (size, size),
              Image.Resampling.BILINEAR,
              box=box,
              reducing_gap=REDUCING_GAP if draft else None,
          ),
          np.uint8,
      )
  except (OSError, UnidentifiedImageError) as e:
    raise DataError(f'{path}: not a readable image ({e})') from None


@dataclasses.dataclass(frozen=True)
class BatchReader:
  """Reads one index batch of a streamed split into images (runs in grain's workers).

  A training batch carries the epoch's `crop_key` (`fineflax.data.train_batches`); an
  evaluation batch does not, and gets the evaluation crop. `draft`: training crops of
  image files are decoded and resized faster, within about a level (`decode_crop`).
  """

  records: Any
  image_size: int
  crop: str | None
  draft: bool = False

  def _example(self, index: int, crop_key: Any) -> tuple[np.ndarray, int]:
    train, rng = crop_key is not None, None
    if train and self.crop is not None:
      rng = np.random.default_rng([*np.asarray(crop_key).tolist(), index])
    if rng is not None and isinstance(self.records, FileRecords):
      # The box needs only the file's header: the decode can then be scaled to it.
      image = decode_crop(
          self.records.files[index],
          self.image_size,
          lambda w, h: random_resized_box(w, h, rng),
          self.draft,
      )
      return image, int(self.records.labels[index])
    image, label = self.records.read(index)
    return host_image(image, self.image_size, self.crop, train, rng), label

  def __call__(self, batch: Batch) -> Batch:
    index, weight = batch['index'], batch['weight'].copy()
    crop_key = batch.get('crop_key')
    images, labels, unreadable = [], [], []
    for row, i in enumerate(index):
      image, label = None, 0
      for k in range(_STAND_INS + 1):  # the example, else others in its place
        try:
          image, label = self._example((int(i) + k) % len(self.records), crop_key)
          break
        except DataError:
          if k == 0:
            unreadable.append(int(i))
            weight[row] = 0
      if image is None:
        image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
      images.append(image)
      labels.append(label)
    return {
        'image': np.stack(images),
        'label': np.asarray(labels, np.int32),
        'weight': weight,
        'unreadable': np.asarray(unreadable, np.int64),
    }


def default_workers() -> int:
  """Decoding processes when `config.data.workers` is None: one per core, up to 16."""
  return min(os.cpu_count() or 1, 16)


def read_batches(split: StreamSplit, batches: Iterable[Batch]) -> Iterator[Batch]:
  """The image batches of `batches` (index batches of `split`), in order: read by the
  split's decoding processes, or by grain's threads in this one (`workers` = 0)."""
  if split.workers:
    read = decoders.read(
        split, BatchReader(split.records, split.image_size, split.crop, split.draft), batches
    )
  else:
    read = _threads(split, batches)
  for batch in read:
    for i in batch.pop('unreadable'):
      if int(i) not in split.unreadable:  # once a process, not once an epoch
        split.unreadable.add(int(i))
        logger.warning(
            '%s: not a readable image; it is skipped (its rows count nothing)',
            split.records.name(int(i)),
        )
    yield batch


def _threads(split: StreamSplit, batches: Iterable[Batch]) -> Iterator[Batch]:
  """Grain's threads over the index batches, listed first (integers only; an epoch of
  ImageNet is 1.3 M) so that grain hands them out by position."""
  import grain  # pylint: disable=g-import-not-at-top

  listed = list(batches)
  if not listed:
    return
  reader = BatchReader(split.records, split.image_size, split.crop, split.draft)
  threads = min(os.cpu_count() or 1, 16)
  yield from grain.MapDataset.source(listed).map(reader).to_iter_dataset(
      grain.ReadOptions(num_threads=threads, prefetch_buffer_size=_PREFETCH_BATCHES * threads)
  )


def read_examples(
    split: StreamSplit, indices: Sequence[int], crop_key: Any = None
) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of `indices`, read here (a few: samples.png): as training
  sees them under `crop_key`, or as evaluation does when it is None."""
  reader = BatchReader(split.records, split.image_size, split.crop, split.draft)
  index = np.asarray(indices, np.int64)
  batch = {'index': index, 'weight': np.ones(len(index), np.float32)}
  if crop_key is not None:
    batch['crop_key'] = crop_key
  read = reader(batch)
  return read['image'], read['label']
