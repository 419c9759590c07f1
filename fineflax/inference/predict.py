"""Class probabilities for image files: of a trained run, or zero-shot ImageNet-1k.

    python -m fineflax.predict --workdir runs/demo [--checkpoint best] 3.png 7.png
    python -m fineflax.predict --config configs/imagenet.py --top_k 3 elephant.jpg

print, per image, the top-k classes with their probabilities. `--workdir` uses a run's
checkpoint and class names, the images prepared as the run's evaluation prepares them.
`--config` uses the config's model and pretrained weights: with Keras' ImageNet top
(`config.model.include_top`) the 1,000 ImageNet classes by WordNet id and name, as Keras'
`decode_predictions` does (seed 004).
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fineflax import config as config_lib, data, models
from fineflax.distributed import parallel
from fineflax.inference import evaluate
from fineflax.run import restore
from fineflax import weights
from fineflax.train import state as state_lib
from fineflax.data import augment as augmentation
from fineflax.data.images import read_image
from fineflax.errors import ConfigError
from fineflax.inference.evaluate import probabilities

logger = logging.getLogger('fineflax.predict')


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1,000 ImageNet-1k classes in classifier order: (WordNet id, Keras-style name)."""
  text = importlib.resources.files('fineflax').joinpath('imagenet_classes.txt').read_text()
  rows = [line.split('\t') for line in text.splitlines() if line and not line.startswith('#')]
  # Keras' class index names a class by its first WordNet lemma, spaces as underscores.
  return tuple((wnid, lemmas.split(',')[0].strip().replace(' ', '_')) for wnid, lemmas in rows)


def _model_probabilities(model: models.Classifier) -> Callable[[Any, np.ndarray], jax.Array]:
  """A jitted `(variables, uint8 images at the model's size) -> class probabilities`."""

  @jax.jit
  def predict(variables, images):
    return probabilities(model.apply(variables, images))

  return predict


def resize_uint8(images: jax.Array, height: int, width: int) -> jax.Array:
  """(n, h, w, 3) uint8 resized to (n, height, width, 3) uint8: bilinear, antialiased when
  shrinking (as PIL resizes the files a run stores), rounded to the nearest level."""
  if images.shape[1:3] == (height, width):
    return images
  resized = jax.image.resize(images.astype(jnp.float32),
                             (images.shape[0], height, width, images.shape[3]),
                             method='linear', antialias=True)
  return jnp.clip(jnp.round(resized), 0, 255).astype(jnp.uint8)


def predict_fn(run: restore.RestoredRun) -> Callable[[np.ndarray], jax.Array]:
  """A function, compiled with jax.jit, from uint8 images to the run's class probabilities.

  The function takes (n, H, W, 3) or (H, W, 3) uint8 images of any size and returns
  (n, classes) (or (classes,)) float32 probabilities, on this process's first device. The
  images are first resized to the shape the run's dataset stores (`run.image_shape`), then
  prepared as the run's evaluation prepares them (centre crop, resize to the model's
  input, the model's normalisation), so images of the stored shape get what
  `fineflax.evaluate` computes for them (to float32 rounding: its batches differ). Each
  new image size compiles once.

      run = fineflax.load_run('runs/demo')
      probs = fineflax.predict_fn(run)(images)
  """
  height, width = run.image_shape[:2]
  augment = data.augment_from_config(run.config.data)
  model = run.model

  @jax.jit
  def predict(variables: dict[str, Any], images: jax.Array) -> jax.Array:
    images = augmentation.prepare(resize_uint8(images, height, width), None, augment,
                                  model.image_size, train=False)
    return probabilities(model.apply(variables, images, train=False).astype(jnp.float32))

  variables = jax.device_put(run.variables, jax.local_devices()[0])

  def call(images: np.ndarray) -> jax.Array:
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
      raise ValueError(f'images of shape {images.shape} and dtype {images.dtype}: expected '
                       'uint8 RGB images, (n, H, W, 3) or one (H, W, 3)')
    probs = predict(variables, batch)
    return probs[0] if single else probs

  return call


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
  """Per row, the k most probable (class name, probability), most probable first."""
  order = np.argsort(-probs, axis=-1)[:, :k]
  return [[(class_names[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


def predict_files(config: ml_collections.ConfigDict, paths: Sequence[str],
                  k: int = 5) -> list[list[tuple[str, float]]]:
  """The top-k classes of each image file under `config`'s model and weights."""
  config = config_lib.validate(config)
  if config.model.include_top and (config.model.num_classes or 1000) == 1000:
    names = [f'{name} ({wnid})' for wnid, name in imagenet_classes()]
  else:
    names = list(data.dataset_info(config.data).class_names)
  size = config.model.image_size or models.BACKBONES[config.model.backbone].input_size
  images = np.stack([read_image(p, size) for p in paths])  # a bad file fails before loading
  model = models.from_config(config, tuple(names))
  variables = state_lib.init_variables(model, (size, size, 3), config.seed)
  if config.model.weights is None:
    logger.warning('config.model.weights is None: predicting with random weights')
  else:
    variables, report = weights.load_pretrained(config.model, model, variables)
    logger.info(report.text())
    initialised = [name for name in report.initialised if name.startswith('head/')]
    if config.model.include_top and initialised:
      raise ConfigError(f'{config.model.weights} holds no classifier for the ImageNet top '
                        f'({", ".join(initialised)} would be random); use the file with the '
                        'top, not the _notop one')
  probs = np.asarray(_model_probabilities(model)(variables, images))
  return top_k(probs, names, k)


def read_images(paths: Sequence[str], image_shape: Sequence[int]) -> np.ndarray:
  """(n, H, W, 3) uint8: the image files resized (bilinear) to `image_shape`."""
  height, width = image_shape[:2]
  if height == width:
    return np.stack([read_image(p, height) for p in paths])
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.stack([np.asarray(Image.fromarray(read_image(p)).resize(
      (width, height), Image.Resampling.BILINEAR)) for p in paths])


def predict_run_files(workdir: str | os.PathLike, paths: Sequence[str], k: int = 5,
                      checkpoint: str | int = 'best', *,
                      devices: Sequence[jax.Device] | None = None
                      ) -> list[list[tuple[str, float]]]:
  """The top-k classes of each image file under a checkpoint of the run in `workdir`.

  The images are resized to the shape the run's dataset stores, then prepared on the
  device as the run's evaluation prepares them (resize, centre crop), on `devices`
  (default: every device).
  """
  info = restore.read_dataset_info(workdir, restore.read_config(workdir))
  images = read_images(paths, info.image_shape)  # a bad file fails before the checkpoint
  run = restore.load_run(workdir, checkpoint)
  mesh = parallel.make_mesh(devices)
  count = mesh.devices.size
  # One batch of the images when they fit in the run's eval batch; padding rows are dropped.
  size = min(evaluate.eval_batch_size(None, run.config, count), -(-len(images) // count) * count)
  logits_step = evaluate.make_logits_step(run.model, mesh,
                                          augment=data.augment_from_config(run.config.data))
  logits, _ = evaluate.split_logits(logits_step, parallel.replicate(run.variables, mesh),
                                    data.Split(images, np.zeros(len(images), np.int32)),
                                    size, mesh)
  probs = np.asarray(probabilities(logits))
  # Outputs beyond the dataset's classes (a config's num_classes may be larger) get a name.
  names = list(run.class_names) + [f'output {i}' for i in range(len(run.class_names),
                                                                probs.shape[-1])]
  return top_k(probs, names, k)
