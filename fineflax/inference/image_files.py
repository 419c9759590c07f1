"""The image files a prediction reads: a folder argument as its image files
(`image_paths`), and each file read, or the one-line reason it could not be (`read_all`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fineflax.data import pipeline, stream
from fineflax.data.folder import IMAGE_SUFFIXES
from fineflax.data.images import open_rgb, read_image
from fineflax.errors import DataError


def image_paths(args: Sequence[str | os.PathLike]) -> list[str]:
  """The files `args` name: a file as given; a folder as its image files, sorted.

  A folder's image files are those directly in it with a suffix the folder data source
  reads (IMAGE_SUFFIXES, any case); other files, hidden ones (macOS' `._x.jpg`) and
  sub-folders are left out. Sub-folders are not recursed into: a dataset's folder given by
  mistake would otherwise predict every image of every class, and `DIR` then means the
  images `ls DIR` shows (`DIR/*/` names the sub-folders when they are meant). A folder
  without image files stays in the list: reading it reports that.
  """
  paths = []
  for arg in args:
    folder, found = Path(arg), []
    if folder.is_dir() and os.access(folder, os.R_OK | os.X_OK):
      found = sorted(
          str(p)
          for p in folder.iterdir()
          if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in IMAGE_SUFFIXES
      )
    paths += found or [str(arg)]
  return paths


def read_all(
    paths: Sequence[str], read: Callable[[str], np.ndarray]
) -> tuple[list[np.ndarray | None], list[str | None]]:
  """Each file read by `read`, or None and the one-line reason it could not be."""
  images, errors = [], []
  for path in paths:
    image, error = None, None
    if Path(path).is_dir():
      error = (
          f'{path}: a folder without image files ({", ".join(IMAGE_SUFFIXES)})'
          if os.access(path, os.R_OK | os.X_OK)
          else f'{path}: a folder it may not read'
      )
    else:
      try:
        image = read(path)
      except (ValueError, SyntaxError) as e:  # DataError; PIL's own errors on odd files
        error = str(e) if isinstance(e, DataError) else f'{path}: not a readable image ({e})'
    images.append(image)
    errors.append(error)
  return images, errors


def read_resized(path: str, image_shape: Sequence[int], crop: Any = None) -> np.ndarray:
  """(H, W, 3) uint8: the image file resized (bilinear) to `image_shape`; for a run whose
  host cropped the originals (`crop` 'random_resized'), as its evaluation read them."""
  height, width = image_shape[:2]
  if crop == pipeline.RANDOM_RESIZED:
    return stream.host_image(open_rgb(path), height, crop, train=False)
  if height == width:
    return read_image(path, height)
  from PIL import Image  # pylint: disable=g-import-not-at-top

  return np.asarray(
      Image.fromarray(read_image(path)).resize((width, height), Image.Resampling.BILINEAR)
  )
