"""Reading image files into uint8 RGB arrays (JPEG, PNG, BMP, GIF; grey and RGBA too)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fineflax.errors import DataError


def open_rgb(path: str | os.PathLike) -> Any:
  """The decoded image as an RGB PIL image.

  Raises:
    DataError: the file is missing or not a readable image (named in the message).
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except (OSError, UnidentifiedImageError) as e:
    raise DataError(f'{path}: not a readable image ({e})') from None


def read_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """(H, W, 3) uint8 RGB; resized to size x size (bilinear) when `size` is given.

  Raises:
    DataError: the file is missing or not a readable image (named in the message).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  image = open_rgb(path)
  if size is not None and image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, np.uint8)
