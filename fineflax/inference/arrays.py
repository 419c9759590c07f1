"""Class probabilities of images in memory: `predict_fn`, from uint8 arrays of any size
to a run's class probabilities.

    run = fineflax.load_run('runs/demo')
    probs = fineflax.predict_fn(run)(images)
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fineflax import data
from fineflax.data import augment as augmentation, pipeline, stream
from fineflax.inference.evaluate import probabilities
from fineflax.run import restore

# What predict_fn takes, said in its errors.
_EXPECTED = (
    'expected uint8 RGB images: an (n, H, W, 3) array, one (H, W, 3) image, or a '
    'list of (H, W, 3) images of any sizes'
)


def resize_uint8(images: jax.Array, height: int, width: int) -> jax.Array:
  """(n, h, w, 3) uint8 resized to (n, height, width, 3) uint8: bilinear, antialiased when
  shrinking (as PIL resizes the files a run stores), rounded to the nearest level."""
  if images.shape[1:3] == (height, width):
    return images
  resized = jax.image.resize(
      images.astype(jnp.float32),
      (images.shape[0], height, width, images.shape[3]),
      method='linear',
      antialias=True,
  )
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def _image_array(value: Any, name: str, ndims: tuple[int, ...]) -> np.ndarray:
  """`value` as a uint8 RGB array of one of `ndims` dimensions, or a one-line ValueError
  naming what it is (`name`: 'images', 'images[3]')."""
  try:
    array = np.asarray(value)
  except ValueError:  # numpy's "inhomogeneous shape": a ragged sequence
    array = None
  # What numpy cannot read as numbers (a path, a dict, ragged lists) is named by its type:
  # its "shape () and dtype <U5" would only puzzle.
  if array is None or array.dtype.kind not in 'biuf':
    shown = f' ({value!r:.60})' if isinstance(value, (str, bytes, os.PathLike)) else ''
    what = 'None' if value is None else f'a {type(value).__name__}{shown}'
    raise ValueError(f'{name} is {what}: {_EXPECTED}')
  if array.ndim not in ndims or array.shape[-1] != 3 or array.dtype != np.uint8:
    raise ValueError(f'{name} of shape {array.shape} and dtype {array.dtype}: {_EXPECTED}')
  return array


def predict_fn(run: restore.RestoredRun) -> Callable[[Any], jax.Array]:
  """A function, compiled with jax.jit, from uint8 images to the run's class probabilities.

  The function takes an (n, H, W, 3) uint8 array, one (H, W, 3) image, or a list (or
  tuple) of (H, W, 3) uint8 images of any sizes, and returns (n, classes) (or (classes,))
  float32 probabilities, on this process's first device; anything else is a ValueError
  naming what was given. Each image is first resized to the shape the run's dataset
  stores (`run.image_shape`; `resize_uint8`, the same for an array and a list), then
  prepared as the run's evaluation prepares them (centre crop, resize to the model's
  input, the model's normalisation), so images of the stored shape get what
  `fineflax.evaluate` computes for them (to float32 rounding: its batches differ). For a
  run trained on random-resized crops, images of another shape are originals: they get
  evaluation's centre crop (`fineflax.data.stream.centre_box`) on the host first. Each
  new image size compiles a resize once; each new batch size compiles the model once.

      run = fineflax.load_run('runs/demo')
      probs = fineflax.predict_fn(run)(images)
  """
  height, width = run.image_shape[:2]
  augment = data.augment_from_config(run.config.data)
  model = run.model

  @jax.jit
  def predict(variables: dict[str, Any], images: jax.Array) -> jax.Array:
    images = augmentation.prepare(images, None, augment, model.image_size, train=False)
    return probabilities(model.apply(variables, images, train=False).astype(jnp.float32))

  # The resize is compiled apart from the model: a list of photos of as many sizes then
  # compiles one small resize per size, and the model once, not the model per size.
  resize = jax.jit(resize_uint8, static_argnums=(1, 2))
  device = jax.local_devices()[0]
  variables = jax.device_put(run.variables, device)
  # A run whose host cropped the originals (augment.crop 'random_resized') stores centre
  # crops: images of another shape are originals, and get the crop evaluation gave them.
  cropped = run.config.data.augment.crop == pipeline.RANDOM_RESIZED

  def _cropped(array: np.ndarray) -> np.ndarray:
    if not cropped or array.shape[:2] == (height, width):
      return array
    from PIL import Image  # pylint: disable=g-import-not-at-top

    return stream.host_image(
        Image.fromarray(np.asarray(array)), height, pipeline.RANDOM_RESIZED, train=False
    )

  def call(images: Any) -> jax.Array:
    if isinstance(images, (list, tuple)):
      if not images:
        raise ValueError(f'images is an empty {type(images).__name__}: {_EXPECTED}')
      arrays = [
          _cropped(_image_array(image, f'images[{i}]', (3,))) for i, image in enumerate(images)
      ]
      return predict(
          variables,
          jnp.concatenate([resize(jax.device_put(a[None], device), height, width) for a in arrays]),
      )
    array = _image_array(images, 'images', (3, 4))
    single = array.ndim == 3
    if cropped:
      array = np.stack([_cropped(a) for a in (array[None] if single else array)])
      array = array[0] if single else array
    batch = resize(jax.device_put(array[None] if single else array, device), height, width)
    probs = predict(variables, batch)
    return probs[0] if single else probs

  return call
