"""`DIR/samples.png`: training images exactly as the model receives them (after the crop,
the resize and the augmentation; before the weights' normalisation), with class names:
the 3x3 grids of the Keras guides (seeds 001 and 002)."""

from __future__ import annotations

import os

import jax
import numpy as np
from etils import epath

from fineflax.data import augment as augmentation, stream
from fineflax.data.dataset import AnySplit, StreamSplit, host_crop_key

_CELL = 128  # pixels per image in the grid, at least


def sample_images(
    split: AnySplit, aug: augmentation.Augment, size: int | None, seed: int, count: int = 9
) -> tuple[np.ndarray, np.ndarray]:
  """The first `count` training images as step 0 augments them, uint8, and their labels."""
  if isinstance(split, StreamSplit):  # as the host crops them in the first epoch
    key = host_crop_key(np.random.default_rng([seed, 0, 0]))
    images, labels = stream.read_examples(split, range(min(count, len(split))), key)
  else:
    images, labels = split.images[:count], split.labels[:count]
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), 0)
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(np.arange(len(images)))
  out = augmentation.prepare(images, keys, aug, size, train=True)
  return np.asarray(jax.numpy.clip(jax.numpy.round(out), 0, 255)).astype(np.uint8), labels


def write_samples(
    path: str | os.PathLike,
    split: AnySplit,
    class_names: tuple[str, ...],
    aug: augmentation.Augment,
    size: int | None,
    seed: int,
) -> None:
  """Writes the grid of `sample_images` as a PNG, each image labelled with its class."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top

  images, labels = sample_images(split, aug, size, seed)
  if not len(images):
    return
  side = images.shape[1]
  scale = max(1, -(-_CELL // side))
  cell, text_h, cols = side * scale, 14, 3
  rows = -(-len(images) // cols)
  grid = Image.new('RGB', (cols * cell, rows * (cell + text_h)), 'white')
  draw = ImageDraw.Draw(grid)
  for i, (image, label) in enumerate(zip(images, labels)):
    x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
    grid.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
    draw.text((x + 2, y + cell + 1), class_names[label], fill='black')
  with epath.Path(path).open('wb') as f:  # a local path or gs://
    grid.save(f, format='PNG')
