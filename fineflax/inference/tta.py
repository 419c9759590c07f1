"""Test-time augmentation: a batch's logits averaged over views of each image, the views
cut on the device from the batch inside the jitted step (no host copy of a split).

    none     the image as evaluation prepares it
    flip     that image and its horizontal mirror
    5crop    torchvision's FiveCrop: the four corner crops and the centre crop, each of the
             model's input side, from the image prepared at side round(size / 0.875)
             (224 -> 256, 32 -> 37) instead of `size`
    10crop   torchvision's TenCrop: the five crops and the five crops of the mirrored image

"Prepared" is `augment.prepare`'s evaluation path: the run's centre window (its
`config.data.augment.crop`) resized to a square. Crops sit where torchvision puts them:
the centre crop's corner at int(round((side - size) / 2)).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from fineflax.data import augment as augmentation
from fineflax.data.augment import Augment
from fineflax.errors import ConfigError

MODES = ('none', 'flip', '5crop', '10crop')
# The crops' source side is size / CROP_FRACTION: ImageNet's 224 of 256.
CROP_FRACTION = 0.875


def check_mode(mode: str) -> str:
  """`mode` if it is one of MODES, else a one-line ConfigError."""
  if mode not in MODES:
    raise ConfigError(f'--tta {mode!r}: expected one of {", ".join(MODES)}')
  return mode


@dataclasses.dataclass(frozen=True)
class Views:
  """Where the views of one TTA mode lie in the image they are cut from.

  Attributes:
    side: the side of that (square) image.
    size: the side of each view (the model's input).
    boxes: per view, (top, left, mirrored): a size x size crop at (top, left), mirrored
      left to right after cropping when `mirrored`.
  """

  side: int
  size: int
  boxes: tuple[tuple[int, int, bool], ...]


def views(mode: str, size: int) -> Views:
  """The views of `mode` (MODES) for a model whose input side is `size`."""
  check_mode(mode)
  if mode in ('none', 'flip'):
    return Views(size, size, ((0, 0, False), (0, 0, True))[: 1 + (mode == 'flip')])
  side = int(round(size / CROP_FRACTION))
  far = side - size
  centre = int(round(far / 2))
  # torchvision's order: top-left, top-right, bottom-left, bottom-right, centre.
  five = ((0, 0), (0, far), (far, 0), (far, far), (centre, centre))
  boxes = [(top, left, False) for top, left in five]
  if mode == '10crop':
    # A crop at `left` of the mirrored image is the mirror of the crop at far - left.
    boxes += [(top, far - left, True) for top, left in five]
  return Views(side, size, tuple(boxes))


def source_images(
    images: jax.Array, augment: Augment, mode: str, size: int | None
) -> tuple[jax.Array, Views]:
  """The batch prepared at the side the views of `mode` are cut from, and the views.

  `size`: the model's input side (None: the stored side, as `augment.prepare`)."""
  size = size or images.shape[1]
  where = views(mode, size)
  return augmentation.prepare(images, None, augment, where.side, train=False), where


def view_images(source: jax.Array, where: Views) -> jax.Array:
  """(views, B, size, size, C): every view of every image of `source` (B, side, side, C)."""
  return jnp.stack(
      [_cut(source, top, left, mirrored, where.size) for top, left, mirrored in where.boxes]
  )


def _cut(source: jax.Array, top, left, mirrored, size: int) -> jax.Array:
  crop = jax.lax.dynamic_slice(
      source, (0, top, left, 0), (source.shape[0], size, size, source.shape[3])
  )
  return jnp.where(mirrored, crop[:, :, ::-1], crop)


def averaged_logits(
    apply: Callable[[jax.Array], jax.Array], source: jax.Array, where: Views
) -> jax.Array:
  """The mean over the views of `apply(view)` (float32 logits).

  The views go through the model one after another (`lax.map`): the model is compiled
  once, and memory holds one view of the batch at a time, not ten.
  """
  if where.boxes == ((0, 0, False),):
    return apply(source).astype(jnp.float32)
  tops, lefts, mirrored = (jnp.asarray(column) for column in zip(*where.boxes))

  def one(box: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    return apply(_cut(source, *box, where.size)).astype(jnp.float32)

  return jnp.mean(jax.lax.map(one, (tops, lefts, mirrored)), axis=0)
