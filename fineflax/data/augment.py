"""On-device augmentation and resize: one affine map per image, one bilinear gather.

Each training image gets a 3x3 matrix that maps pixel coordinates of the model's input
(size x size) to coordinates of the stored image. It composes, from the stored image
outwards: a random crop (`crop`), the resize to the model's size, then flip, rotation,
zoom and translation, each with Keras' meaning and parameters (`RandomFlip`,
`RandomRotation(factor)`: a fraction of a full turn, `RandomZoom(factor)`,
`RandomTranslation(factor)`), in that order. The image is then sampled once, bilinearly,
with Keras' fill modes (`reflect` by default), as `keras.ops.image.affine_transform` does
on the JAX backend. One sample instead of one per layer: no blur from repeated
interpolation, and one gather per output pixel whatever the number of augmentations.

Randomness is a function of (seed, step, example index in the global batch): the same
images get the same augmentation on 1 or 8 devices, and on a resumed run. Evaluation
applies no augmentation; a `crop` becomes a centre crop, as Keras' RandomCrop does at
inference.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

FLIPS = ('none', 'horizontal', 'vertical', 'horizontal_and_vertical')
FILL_MODES = ('reflect', 'wrap', 'constant', 'nearest')


@dataclasses.dataclass(frozen=True)
class Augment:
  """The augmentations of `config.data.augment`; all off by default."""

  flip: str = 'none'
  rotation: float = 0.0  # angle uniform in [-rotation, rotation] x 360 degrees
  zoom: float = 0.0  # zoom factor uniform in [1 - zoom, 1 + zoom]; > 1 zooms out
  translate: float = 0.0  # shift uniform in [-translate, translate] x the image side
  # Side of a random square crop of the stored image; 'random_resized' is done on the
  # host, from the original image (fineflax.data.stream), and leaves nothing to do here.
  crop: int | str | None = None
  fill_mode: str = 'reflect'
  fill_value: float = 0.0
  mixup: float = 0.0  # alpha of Beta(alpha, alpha); 0: no mixup

  @property
  def geometric(self) -> bool:
    """Whether training images are transformed (beyond a resize)."""
    return (
        self.flip != 'none'
        or self.rotation > 0
        or self.zoom > 0
        or self.translate > 0
        or self.device_crop is not None
    )

  @property
  def device_crop(self) -> int | None:
    """The side of the crop taken here, on the device, if any."""
    return self.crop if isinstance(self.crop, int) else None


def _matrix(a0, a1, a2, b0, b1, b2) -> jax.Array:
  """x_in = a0 x + a1 y + a2, y_in = b0 x + b1 y + b2, as a 3x3 matrix."""
  zero, one = jnp.zeros_like(a0), jnp.ones_like(a0)
  return jnp.stack([jnp.stack([a0, a1, a2]), jnp.stack([b0, b1, b2]), jnp.stack([zero, zero, one])])


def _window(in_hw: tuple[int, int], aug: Augment, train: bool) -> tuple[int, int]:
  """(height, width) of the crop window: the random crop's, Keras' inference crop (the
  largest centred window of the crop's aspect), or the whole image."""
  h, w = in_hw
  if aug.device_crop is None:
    return h, w
  if train:
    return aug.device_crop, aug.device_crop
  return max(min(h, w), 1), max(min(h, w), 1)


def _crop_and_resize(key, in_hw: tuple[int, int], size: int, aug: Augment, train: bool):
  """Output pixel -> stored-image pixel for the crop (random, or centred) and the resize,
  and the (top, left) corner of the crop's window (`_window`)."""
  h, w = in_hw
  ch, cw = _window(in_hw, aug, train)
  y0 = x0 = jnp.float32(0)
  if aug.device_crop is not None:
    if train:
      ky, kx = jax.random.split(key)
      y0 = jax.random.randint(ky, (), 0, h - ch + 1).astype(jnp.float32)
      x0 = jax.random.randint(kx, (), 0, w - cw + 1).astype(jnp.float32)
    else:
      y0, x0 = jnp.float32((h - ch) // 2), jnp.float32((w - cw) // 2)
  # Half-pixel centres, as jax.image.resize: x_in = (x_out + 0.5) * scale - 0.5.
  sy, sx = ch / size, cw / size
  zero = jnp.float32(0)
  matrix = _matrix(
      jnp.float32(sx), zero, x0 + 0.5 * sx - 0.5, zero, jnp.float32(sy), y0 + 0.5 * sy - 0.5
  )
  return matrix, jnp.stack([y0, x0]).astype(jnp.int32)


def augmentation_matrix(
    size: int, hflip=False, vflip=False, angle=0.0, zoom=1.0, dx=0.0, dy=0.0
) -> jax.Array:
  """Output pixel -> pre-augmentation pixel (both size x size), Keras' matrices composed
  in layer order: flip, rotation by `angle` (radians), zoom, shift by (dx, dy) pixels."""
  c = (size - 1) / 2.0
  hs, vs = jnp.where(hflip, -1.0, 1.0), jnp.where(vflip, -1.0, 1.0)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  flip = _matrix(hs, 0.0, c - hs * c, 0.0, vs, c - vs * c)
  rotate = _matrix(cos, -sin, c - c * cos + c * sin, sin, cos, c - c * sin - c * cos)
  scale = _matrix(zoom, 0.0, c * (1 - zoom), 0.0, zoom, c * (1 - zoom))
  shift = _matrix(1.0, 0.0, -dx, 0.0, 1.0, -dy)
  return flip @ rotate @ scale @ shift


def _random_augmentation(key, size: int, aug: Augment) -> jax.Array:
  k_hflip, k_vflip, k_rot, k_zoom, k_tx, k_ty = jax.random.split(key, 6)
  uniform = lambda k, r: jax.random.uniform(k, (), minval=-r, maxval=r)
  horizontal = aug.flip in ('horizontal', 'horizontal_and_vertical')
  vertical = aug.flip in ('vertical', 'horizontal_and_vertical')
  return augmentation_matrix(
      size,
      hflip=horizontal and jax.random.bernoulli(k_hflip),
      vflip=vertical and jax.random.bernoulli(k_vflip),
      angle=uniform(k_rot, aug.rotation) * 2 * math.pi,
      zoom=1 + uniform(k_zoom, aug.zoom),
      dx=uniform(k_tx, aug.translate) * size,
      dy=uniform(k_ty, aug.translate) * size,
  )


def _fix_index(index: jax.Array, n: int, mode: str) -> jax.Array:
  """Out-of-range pixel indices, as `jax.scipy.ndimage.map_coordinates` treats them."""
  if mode == 'nearest':
    return jnp.clip(index, 0, n - 1)
  if mode == 'wrap':
    return index % n
  if mode == 'reflect':  # d c b a | a b c d | d c b a
    period = 2 * n
    index = index % period
    return jnp.where(index < n, index, period - 1 - index)
  return index  # 'constant': masked below


def warp(
    images: jax.Array,
    matrices: jax.Array,
    size: int,
    fill_mode: str = 'reflect',
    fill_value: float = 0.0,
    corners: jax.Array | None = None,
    window: tuple[int, int] | None = None,
) -> jax.Array:
  """(B, H, W, C) images sampled bilinearly on a size x size grid mapped by (B, 3, 3).

  With a crop, `corners` (B, 2) holds each window's (top, left) and `window` its (height,
  width): pixels outside the window are filled as if the window were the image (`fill_mode`
  from its edges), as Keras' layers after a `RandomCrop` see only the crop.
  """
  _, h, w, _ = images.shape
  if corners is None:
    corners = jnp.zeros((images.shape[0], 2), jnp.int32)
  wh, ww = window or (h, w)
  ys, xs = jnp.meshgrid(
      jnp.arange(size, dtype=jnp.float32), jnp.arange(size, dtype=jnp.float32), indexing='ij'
  )
  grid = jnp.stack([xs, ys, jnp.ones_like(xs)], axis=-1)  # (S, S, 3): x, y, 1

  def one(image, m, corner):
    top, left = corner[0], corner[1]
    coords = grid @ m.T
    x, y = coords[..., 0], coords[..., 1]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx, wy = x - x0, y - y0
    out = 0.0
    for dy, wy_ in ((0, 1 - wy), (1, wy)):
      for dx, wx_ in ((0, 1 - wx), (1, wx)):
        # Indices within the window, fixed where they leave it, then in the image again.
        yi = (y0 + dy).astype(jnp.int32) - top
        xi = (x0 + dx).astype(jnp.int32) - left
        pixel = image[
            (_fix_index(yi, wh, fill_mode) + top).clip(0, h - 1),
            (_fix_index(xi, ww, fill_mode) + left).clip(0, w - 1),
        ]
        if fill_mode == 'constant':
          inside = (yi >= 0) & (yi < wh) & (xi >= 0) & (xi < ww)
          pixel = jnp.where(inside[..., None], pixel, fill_value)
        out = out + (wy_ * wx_)[..., None] * pixel
    return out

  return jax.vmap(one)(images.astype(jnp.float32), matrices, corners)


def prepare(
    images: jax.Array, keys: jax.Array | None, aug: Augment, size: int | None, train: bool
) -> jax.Array:
  """uint8 images as the model sees them: cropped, resized and (in training) augmented.

  Args:
    images: (B, H, W, C) stored images.
    keys: (B,) per-example random keys; needed only when training with augmentation.
    aug: the augmentations.
    size: the model's input side; None keeps the stored size.
    train: augment (otherwise only the centre crop and the resize).
  Returns:
    float32 images in [0, 255]; the input itself (as float32) when nothing applies.
  """
  _, h, w, _ = images.shape
  size = size or h
  augmenting = train and aug.geometric
  if not augmenting and aug.device_crop is None and (h, w) == (size, size):
    return images.astype(jnp.float32)
  if augmenting:

    def matrix(key):
      k_crop, k_aug = jax.random.split(key)
      crop, corner = _crop_and_resize(k_crop, (h, w), size, aug, True)
      return crop @ _random_augmentation(k_aug, size, aug), corner

    matrices, corners = jax.vmap(matrix)(keys)
  else:
    m, corner = _crop_and_resize(None, (h, w), size, aug, False)
    matrices = jnp.broadcast_to(m, (images.shape[0], 3, 3))
    corners = jnp.broadcast_to(corner, (images.shape[0], 2))
  return warp(
      images,
      matrices,
      size,
      aug.fill_mode,
      aug.fill_value,
      corners,
      _window((h, w), aug, augmenting),
  )


def mixup_draws(
    key: jax.Array, alpha: float, global_batch: int, ids: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(partner, weight of own) of the examples at global indices `ids`: partners are a
  permutation of the whole global batch and weights Beta(alpha, alpha) draws keyed by the
  example's global index, so the draws do not depend on how many devices share the batch.
  The loss is weight x loss(own label) + (1 - weight) x loss(partner's label), which is
  the cross-entropy against the mixed one-hot label (Keras `MixUp`)."""
  k_perm, k_lam = jax.random.split(key)
  partner = jax.random.permutation(k_perm, global_batch)[ids]
  lam = jax.vmap(lambda i: jax.random.beta(jax.random.fold_in(k_lam, i), alpha, alpha))(ids)
  return partner, lam


def mix(images: jax.Array, partners: jax.Array, lam: jax.Array) -> jax.Array:
  """Each image blended with its partner image by its own weight."""
  lam = lam[:, None, None, None]
  return lam * images + (1 - lam) * partners
