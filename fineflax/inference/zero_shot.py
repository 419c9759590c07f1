"""Zero-shot prediction on image files: a config's model with its pretrained weights, and
with Keras' ImageNet top (`config.model.include_top`) the 1,000 ImageNet classes by
WordNet id and name, as Keras' `decode_predictions` names them.

    python -m fineflax.predict --config configs/imagenet.py --top_k 3 elephant.jpg
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from fineflax import config as config_lib, data, models, weights
from fineflax.data.images import read_image
from fineflax.errors import ConfigError
from fineflax.inference import image_files
from fineflax.inference.evaluate import probabilities
from fineflax.inference.predictions import Predictions, Ranked, predictions_of, top_k
from fineflax.train import state as state_lib

logger = logging.getLogger('fineflax.predict')


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1,000 ImageNet-1k classes in classifier order: (WordNet id, Keras-style name)."""
  text = importlib.resources.files('fineflax').joinpath('imagenet_classes.txt').read_text()
  rows = [line.split('\t') for line in text.splitlines() if line and not line.startswith('#')]
  # Keras' class index names a class by its first WordNet lemma, spaces as underscores.
  return tuple((wnid, lemmas.split(',')[0].strip().replace(' ', '_')) for wnid, lemmas in rows)


def _setup(config: ml_collections.ConfigDict) -> tuple[Any, list[str], int]:
  """The validated config, its class names and its model's input size."""
  config = config_lib.validate(config)
  if config.model.include_top and (config.model.num_classes or 1000) == 1000:
    names = [f'{name} ({wnid})' for wnid, name in imagenet_classes()]
  else:
    names = list(data.dataset_info(config.data).class_names)
  return (
      config,
      names,
      config.model.image_size or models.BACKBONES[config.model.backbone].input_size,
  )


def _top_k(
    config: ml_collections.ConfigDict, names: list[str], size: int, images: np.ndarray, k: int
) -> list[Ranked]:
  """The top-k classes of `images` (size x size) under `config`'s model and weights."""
  model = models.from_config(config, tuple(names))
  variables = state_lib.init_variables(model, (size, size, 3), config.seed)
  if config.model.weights is None:
    logger.warning('config.model.weights is None: predicting with random weights')
  else:
    variables, report = weights.load_pretrained(config.model, model, variables)
    logger.info(report.text())
    initialised = [name for name in report.initialised if name.startswith('head/')]
    if config.model.include_top and initialised:
      raise ConfigError(
          f'{config.model.weights} holds no classifier for the ImageNet top '
          f'({", ".join(initialised)} would be random); use the file with the '
          'top, not the _notop one'
      )
  predict = jax.jit(lambda variables, images: probabilities(model.apply(variables, images)))
  probs = np.asarray(predict(variables, images))
  return top_k(probs, names, k)


def predict_files(
    config: ml_collections.ConfigDict, paths: Sequence[str], k: int = 5
) -> list[Ranked]:
  """The top-k classes of each image file under `config`'s model and weights.

  Raises:
    DataError: a file that cannot be read (before any weights are loaded).
  """
  config, names, size = _setup(config)
  images = np.stack([read_image(p, size) for p in paths])
  return _top_k(config, names, size, images, k)


def predict_config_paths(
    config: ml_collections.ConfigDict, paths: Sequence[str], k: int = 5
) -> Predictions:
  """As `predict_files`, but a file that cannot be read gets its error in the result
  and the others are still predicted (no weights are loaded when none is readable)."""
  config, names, size = _setup(config)
  paths = [str(p) for p in paths]
  images, errors = image_files.read_all(paths, functools.partial(read_image, size=size))
  return predictions_of(
      paths,
      images,
      errors,
      lambda batch: (_top_k(config, names, size, batch, k), {}),
      weights=config.model.weights,
      backbone=config.model.backbone,
  )
