"""The input pipelines scripts/benchmark_input.py times, each doing the same work per image
of a folder of JPEGs: read the file, decode the whole JPEG to RGB, take an Inception-style
random crop (area 8-100 %, aspect 3/4-4/3), resize it bilinearly to 224 x 224, and deliver
uint8 batches in a shuffled order, on the host (nothing goes to a device). Each is an
endless iterator of batches, yielding the number of images in each, W its worker count:

- fineflax: the `folder:` source with `pipeline='stream'`, `augment.crop=
  'random_resized'`, `workers=W`; `stream.read_batches` over `data.train_batches`, a new
  one every epoch as the training loop does (the split's W decoding processes, started at
  its first read, serve every epoch). W=0: grain's threads in this process (one per core,
  up to 16). `jpeg_draft` is on, but a 500x375 photo has no crop it could draft.
- torch: `ImageFolder` with `RandomResizedCrop(224)` + `PILToTensor()` (uint8, no
  normalisation), `DataLoader(batch_size=B, num_workers=W, shuffle=True)`, a new iterator
  every epoch (its default: workers are not persistent). W=0: this process loads, on one
  torch thread (as each worker does).
- tf: file names shuffled, `tf.io.read_file` -> `tf.io.decode_jpeg(channels=3)` -> a crop
  from `tf.image.stateless_sample_distorted_bounding_box` (the same area and aspect
  ranges) -> `tf.image.resize` (bilinear; TF's default: no antialiasing, which PIL's
  resize does, so TF's resize is the cheaper one) -> uint8, `map(num_parallel_calls=
  AUTOTUNE)`, batch, prefetch, `repeat()`. TF is given W threads: tf.data's private
  thread pool of W threads, 1 thread per op (`max_intra_op_parallelism`) and an autotune
  CPU budget of W. W=0: a sequential map on a private pool of 1 thread.
- tf-accurate: tf with PIL's filters, to tell the filters' cost from the pipelines':
  `decode_jpeg(dct_method='INTEGER_ACCURATE')` (PIL's exact IDCT; TF's default is a
  faster, less exact one) and `resize(antialias=True)`.

An epoch of fineflax or torch that ends without all its batches raises: rates over
dropped batches would lie. `make_folder` writes synthetic photos to time them on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

PIPELINES = ('fineflax', 'torch', 'tf', 'tf-accurate')
SIZE = 224
PHOTO = (500, 375)  # a typical photo: ImageNet's median is 500x375 (or 375x500)
CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as fineflax's
CROP_RATIO = (3 / 4, 4 / 3)


def make_folder(root: str | os.PathLike, count: int, classes: int = 4, seed: int = 0) -> Path:
  """Writes `count` synthetic photos into `classes` class folders under `root`.

  Noise JPEGs would be unlike photos (large files, slow entropy decoding); smooth colour
  fields with some grain come out near a photo's size and decode like one.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  root, rng = Path(root), np.random.default_rng(seed)
  for c in range(classes):
    (root / f'class{c}').mkdir(parents=True, exist_ok=True)
  for i in range(count):
    width, height = PHOTO if i % 2 == 0 else PHOTO[::-1]
    field = rng.integers(0, 256, (6, 8, 3), np.uint8)
    pixels = np.asarray(
        Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), np.int16
    )
    pixels = pixels + rng.normal(0, 10, pixels.shape).astype(np.int16)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(root / f'class{i % classes}' / f'{i:06d}.jpg', quality=90)
  return root


def jpegs(folder: Path) -> list[Path]:
  """The JPEG files in the class folders of `folder` (at any depth below them)."""
  return sorted(
      p for p in folder.glob('*/**/*') if p.is_file() and p.suffix.lower() in ('.jpg', '.jpeg')
  )


def _rows(images: Any, channels_first: bool = False) -> int:
  """The number of images in a delivered batch, after checking their shape and dtype."""
  shape = tuple(images.shape[1:])
  want = (3, SIZE, SIZE) if channels_first else (SIZE, SIZE, 3)
  if shape != want or 'uint8' not in str(images.dtype):
    raise AssertionError(f'a batch of {shape} {images.dtype}, expected {want} uint8')
  return int(images.shape[0])


def _check_epoch(pipeline: str, delivered: int, expected: int) -> None:
  """Raises unless a whole epoch gave all its batches: rates over dropped batches lie."""
  if delivered != expected:
    raise AssertionError(f'{pipeline}: an epoch delivered {delivered} batches, not {expected}')


def fineflax_batches(folder: Path, workers: int, batch: int, seed: int = 0) -> Iterator[int]:
  """Endless batches of fineflax's streaming path (the rows of each)."""
  from fineflax import config as config_lib, data  # pylint: disable=g-import-not-at-top
  from fineflax.data import decoders, stream  # pylint: disable=g-import-not-at-top

  cfg = config_lib.default_config()
  cfg.data.source = f'folder:{folder}'
  cfg.data.load_size = SIZE
  cfg.data.pipeline = 'stream'
  cfg.data.workers = workers
  cfg.data.augment.crop = 'random_resized'
  cfg.data.validation_split = 0.0
  cfg.data.val_split = cfg.data.test_split = None
  split = data.load_dataset(cfg.data, keys=('train_split',)).splits[cfg.data.train_split]
  try:
    for epoch in itertools.count():
      batches = stream.read_batches(
          split, data.train_batches(split, batch, np.random.default_rng([seed, epoch]))
      )
      delivered = 0
      with contextlib.closing(batches):  # a pass stopped mid-epoch releases the workers
        for images in batches:
          delivered += 1
          yield _rows(images['image'])
      _check_epoch('fineflax', delivered, data.num_batches(split, batch))
  finally:
    decoders.close_workers()  # the next run's start-up counts its own


def torch_batches(folder: Path, workers: int, batch: int, seed: int = 0) -> Iterator[int]:
  """Endless batches of torchvision's ImageFolder + DataLoader."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  transform = transforms.Compose(
      [
          transforms.RandomResizedCrop(SIZE, scale=CROP_SCALE, ratio=CROP_RATIO),
          transforms.PILToTensor(),
      ]
  )
  loader = torch.utils.data.DataLoader(
      datasets.ImageFolder(str(folder), transform),
      batch_size=batch,
      num_workers=workers,
      shuffle=True,
  )
  # torch's workers run on 1 thread each; loading in this process (W=0), so does it here:
  # on its default of one thread per core, stacking a batch of permuted uint8 images took
  # 20x longer on the loaded 2-core machine (83 ms against 4 ms).
  threads = torch.get_num_threads()
  if not workers:
    torch.set_num_threads(1)
  try:
    while True:
      iterator, delivered = iter(loader), 0
      try:
        for images, _ in iterator:
          delivered += 1
          yield _rows(images, channels_first=True)
        _check_epoch('torch', delivered, len(loader))
      finally:
        # Stopped mid-epoch: shut the worker processes down now, not at garbage collection.
        shutdown = getattr(iterator, '_shutdown_workers', None)
        if shutdown is not None:
          shutdown()
  finally:
    torch.set_num_threads(threads)


def tf_batches(
    folder: Path, workers: int, batch: int, seed: int = 0, accurate: bool = False
) -> Iterator[int]:
  """Endless batches of a tf.data pipeline doing the same work on W threads; `accurate`:
  with PIL's filters (exact IDCT, antialiased resize) instead of TF's defaults."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], 'GPU')  # host only, as the others
  files = [str(p) for p in jpegs(folder)]
  # The class is the top folder under FOLDER, as ImageFolder and `folder:` sources have it.
  classes = [Path(f).relative_to(folder).parts[0] for f in files]
  labels = {name: i for i, name in enumerate(sorted(set(classes)))}

  def load(index, example):
    path, label = example
    image = tf.io.decode_jpeg(
        tf.io.read_file(path), channels=3, dct_method='INTEGER_ACCURATE' if accurate else ''
    )
    key = tf.stack([tf.constant(seed, tf.int64), index])  # a crop per example and seed
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        tf.zeros([1, 0, 4]),
        seed=key,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_RATIO,
        area_range=CROP_SCALE,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.image.resize(tf.slice(image, begin, size), (SIZE, SIZE), antialias=accurate)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), label

  dataset = tf.data.Dataset.from_tensor_slices((files, [labels[c] for c in classes]))
  dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True).repeat()
  dataset = dataset.enumerate().map(load, num_parallel_calls=tf.data.AUTOTUNE if workers else None)
  dataset = dataset.batch(batch).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(workers, 1)
  options.threading.max_intra_op_parallelism = 1
  options.autotune.cpu_budget = max(workers, 1)
  for images, _ in dataset.with_options(options).as_numpy_iterator():
    yield _rows(images)


RUNNERS: dict[str, Callable[[Path, int, int], Iterator[int]]] = {
    'fineflax': fineflax_batches,
    'torch': torch_batches,
    'tf': tf_batches,
    'tf-accurate': functools.partial(tf_batches, accurate=True),
}
MODULES = {
    'fineflax': ('grain', 'fineflax.data'),
    'torch': ('torch', 'torchvision'),
    'tf': ('tensorflow',),
    'tf-accurate': ('tensorflow',),
}


def missing(pipeline: str) -> str | None:
  """The first module `pipeline` needs that is not installed, else None."""
  return next((m for m in MODULES[pipeline] if importlib.util.find_spec(m) is None), None)
