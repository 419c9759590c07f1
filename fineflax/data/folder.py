"""`folder:PATH`: the user's own images, one sub-folder per class (Keras'
`image_dataset_from_directory`): class ids are the sorted folder names.

Either PATH holds the class folders, and `config.data.validation_split` carves a
validation split out of them (shuffled with `config.data.split_seed`, the last fraction
taken, as Keras does); or PATH holds one folder per split (`train/`, `validation/`,
`test/`, named as `config.data.*_split`), each with the class folders.

JPEG, PNG, BMP and GIF files are read (grey and RGBA become RGB) and resized to
`config.data.load_size` if set. Unreadable or truncated files are skipped with one warning
that counts them and names the first few; other files are counted and ignored; a class
folder without a readable image, or a PATH without class folders, is an error naming it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from fineflax.data import pipeline, stream
from fineflax.data.dataset import Dataset, DatasetInfo, Split, StreamSplit, read_split, share
from fineflax.data.images import read_image
from fineflax.errors import ConfigError, DataError

logger = logging.getLogger('fineflax.data')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_SPLITS = ('train_split', 'val_split', 'test_split')


def _root(spec: str) -> Path:
  root = Path(spec.split(':', 1)[1]).expanduser()
  if not root.is_dir():
    raise ConfigError(f'config.data.source={spec!r}: {root} is not a folder')
  return root


def _class_folders(folder: Path) -> list[Path]:
  classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))
  if not classes:
    raise DataError(f'{folder} has no class folders (one sub-folder per class expected)')
  return classes


def _split_layout(root: Path, data_config: Any) -> dict[str, Path] | None:
  """{split key: folder} when PATH holds one folder per split, else None."""
  names = {key: data_config[key] for key in _SPLITS if data_config[key]}
  folders = {key: root / name for key, name in names.items() if (root / name).is_dir()}
  return folders if 'train_split' in folders else None


def _listing(classes: list[Path]) -> tuple[list[Path], list[int]]:
  """Image files and their labels, class by class, in sorted order (as Keras lists them)."""
  files, labels, ignored = [], [], []
  for label, folder in enumerate(classes):
    found = [p for p in sorted(folder.rglob('*')) if p.is_file()]
    images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
      raise DataError(f'class folder {folder} has no image file')
    files += images
    labels += [label] * len(images)
    ignored += [p for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
  if ignored:
    logger.info(
        'ignored %d files that are no images, e.g. %s', len(ignored), [str(p) for p in ignored[:3]]
    )
  return files, labels


def info(spec: str, data_config: Any) -> DatasetInfo:
  """Class names from the folder names; the image shape from `load_size` or one image."""
  root = _root(spec)
  layout = _split_layout(root, data_config)
  classes = _class_folders(layout['train_split'] if layout else root)
  size = data_config.load_size
  if size is None:
    files, _ = _listing(classes)
    if not files:
      raise DataError(f'{root} holds no image files')
    shape = read_image(files[0]).shape
  else:
    shape = (size, size, 3)
  return DatasetInfo(tuple(shape), tuple(c.name for c in classes))


def _read_all(
    files: list[Path], size: int | None
) -> tuple[np.ndarray, np.ndarray, list[str], set[tuple[int, ...]]]:
  """The readable images of `files`, in order, in one array; the positions in `files` of
  the images read; the errors of the others, in order; the shapes the readable ones had.

  The array is allocated once, at the split's size, and each image decoded into its row:
  a list of images stacked at the end would hold the split twice at the peak. Without
  `size` it is allocated at the shape of the first image decoded; an image of another
  shape is not written (the caller refuses several shapes, named in `shapes`).
  """
  out = np.empty((len(files), size, size, 3), np.uint8) if size is not None else None
  readable = np.zeros(len(files), bool)
  errors: list[str | None] = [None] * len(files)
  shapes: set[tuple[int, ...]] = set()
  lock = threading.Lock()  # guards `shapes` and the allocation of `out`

  def read(i: int) -> None:
    nonlocal out
    try:
      image = read_image(files[i], size)
    except DataError as e:
      errors[i] = str(e)
      return
    with lock:
      shapes.add(image.shape)
      if out is None:
        out = np.empty((len(files), *image.shape), np.uint8)
    if image.shape == out.shape[1:]:
      out[i] = image  # threads write disjoint rows
    readable[i] = True

  workers = min(32, (os.cpu_count() or 1) * 2)  # PIL decodes with the GIL released
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(read, range(len(files))))  # re-raises what is no DataError
  kept = np.flatnonzero(readable)
  if out is None or not len(kept):
    return np.zeros((0, 1, 1, 3), np.uint8), kept, [e for e in errors if e], shapes
  # Skipped files leave holes: the rows read move up in place (row w <= row i, so none is
  # overwritten before it moves), and the split is a view of the first rows, not a copy.
  for w, i in enumerate(kept):
    if w != i:
      out[w] = out[i]
  return out[: len(kept)], kept, [e for e in errors if e], shapes


def _load_split(
    name: str, files: list[Path], labels: list[int], classes: list[Path], data_config: Any
) -> Split:
  """This process's share of a listed split, read; its counts are of the files read."""
  files, labels = files[: data_config.max_examples], labels[: data_config.max_examples]
  idx = share(len(files))
  images, kept, errors, shapes = _read_all([files[i] for i in idx], data_config.load_size)
  if errors:
    logger.warning(
        'config.data.%s: skipped %d unreadable image(s), e.g. %s', name, len(errors), errors[:3]
    )
  if len(shapes) > 1:
    raise DataError(
        f'{classes[0].parent}: images of several sizes {sorted(shapes)[:3]}; '
        'set config.data.load_size to resize them as they are read'
    )
  read = np.asarray([labels[i] for i in idx], np.int32)[kept]
  return read_split(images, read, skipped=len(errors))


def _shape(path: Path) -> tuple[int, ...] | None:
  """The shape of the image `path`, or None when it does not read."""
  try:
    return read_image(path).shape
  except DataError:
    return None


def _streams(
    listings: dict[str, tuple[list[Path], list[int]]], wanted: list[str], data_config: Any
) -> bool:
  """Whether the splits `wanted` are streamed (`fineflax.data.pipeline`); logs why."""
  count = sum(len(listings[key][0][: data_config.max_examples]) for key in wanted)
  size = data_config.load_size
  if size is None and data_config.pipeline != 'memory' and count:
    # The first image that reads: an unreadable file is skipped here, as in the loading.
    height, width, _ = next(
        filter(None, (_shape(f) for files, _ in listings.values() for f in files)), (0, 0, 3)
    )
  else:
    height = width = size or 0
  return pipeline.streams(data_config, count * height * width * 3)


def _stream_split(files: list[Path], labels: list[int], data_config: Any, size: int) -> StreamSplit:
  """A listed split, streamed at `size` px: every process lists every file (it may read
  any)."""
  files, labels = files[: data_config.max_examples], labels[: data_config.max_examples]
  workers = data_config.workers
  labels = np.asarray(labels, np.int32)
  return StreamSplit(
      stream.FileRecords(tuple(str(f) for f in files), labels),
      labels,
      size,
      crop=data_config.augment.crop
      if data_config.augment.crop == pipeline.RANDOM_RESIZED
      else None,
      workers=stream.default_workers() if workers is None else workers,
      draft=data_config.jpeg_draft,
  )


def load(
    spec: str, data_config: Any, keys: Sequence[str] = _SPLITS, stream_size: int | None = None
) -> Dataset:
  """This process's share of the splits of `keys` the config names (every P-th file).

  All are listed (a carved validation split depends on the whole listing); only those of
  `keys` are decoded. A test split whose folder does not exist is left out, with a log
  line: configs name one, and a photo folder may or may not have it. Streamed splits are
  delivered at `config.data.load_size`, or when it is None at `stream_size` (the model's
  input size, said in the log).
  """
  root = _root(spec)
  layout = _split_layout(root, data_config)
  listings: dict[str, tuple[list[Path], list[int]]] = {}
  if layout:
    classes = _class_folders(layout['train_split'])
    for key, folder in layout.items():
      names = [p.name for p in _class_folders(folder)]
      if names != [c.name for c in classes]:
        raise DataError(
            f'{folder} has the classes {names}, {layout["train_split"]} has '
            f'{[c.name for c in classes]}'
        )
      listings[key] = _listing([folder / n for n in names])
  else:
    classes = _class_folders(root)
    files, labels = _listing(classes)
    if not files:
      raise DataError(f'{root} holds no image files')
    fraction = data_config.validation_split
    rng = np.random.RandomState(data_config.split_seed)
    order = rng.permutation(len(files))
    n_val = int(fraction * len(files))
    cut = len(files) - n_val
    listings['train_split'] = ([files[i] for i in order[:cut]], [labels[i] for i in order[:cut]])
    if n_val:
      listings['val_split'] = ([files[i] for i in order[cut:]], [labels[i] for i in order[cut:]])
  absent = []
  for key in _SPLITS:
    if data_config[key] and key not in listings and key == 'test_split':
      absent.append(data_config[key])
      logger.info(
          'config.data.test_split=%r: %s has no such folder; no test split', data_config[key], root
      )
    elif data_config[key] and key not in listings:
      raise ConfigError(
          f'config.data.{key}={data_config[key]!r}: {root} has no folder {data_config[key]!r}'
          + (' and config.data.validation_split is 0' if key == 'val_split' else '')
          + f'; set config.data.{key} = None to go without it'
      )
  wanted = [key for key in _SPLITS if data_config[key] and key in listings and key in keys]
  if _streams(listings, wanted, data_config):
    size = pipeline.stream_load_size(data_config, stream_size)
    splits = {data_config[key]: _stream_split(*listings[key], data_config, size) for key in wanted}
    return Dataset(
        DatasetInfo((size, size, 3), tuple(c.name for c in classes)), splits, tuple(absent)
    )
  splits = {
      data_config[key]: _load_split(key, *listings[key], classes, data_config) for key in wanted
  }
  if jax.process_count() == 1 and set(keys) >= set(_SPLITS):
    # With one process and every split read, a class without a readable image is sure.
    readable = sum(np.bincount(s.labels, minlength=len(classes)) for s in splits.values())
    for label in np.flatnonzero(readable == 0):
      raise DataError(f'class folder {classes[label]} has no readable image')
  shape = (
      next(iter(splits.values())).images.shape[1:]
      if splits
      else info(spec, data_config).image_shape
  )
  return Dataset(DatasetInfo(shape, tuple(c.name for c in classes)), splits, tuple(absent))
