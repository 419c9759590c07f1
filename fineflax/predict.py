"""Class probabilities for image files, and zero-shot ImageNet-1k classification.

    python -m fineflax.predict --config configs/imagenet.py --top_k 3 elephant.jpg

prints, per image, the top-k classes with their probabilities: with Keras' ImageNet top
(`config.model.include_top`) the 1,000 ImageNet classes by WordNet id and name, as Keras'
`decode_predictions` does (seed 004).
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from fineflax import cli, config as config_lib, data, models, state as state_lib, weights
from fineflax.data.images import read_image
from fineflax.errors import ConfigError

logger = logging.getLogger('fineflax.predict')


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1,000 ImageNet-1k classes in classifier order: (WordNet id, Keras-style name)."""
  text = importlib.resources.files('fineflax').joinpath('imagenet_classes.txt').read_text()
  rows = [line.split('\t') for line in text.splitlines() if line and not line.startswith('#')]
  # Keras' class index names a class by its first WordNet lemma, spaces as underscores.
  return tuple((wnid, lemmas.split(',')[0].strip().replace(' ', '_')) for wnid, lemmas in rows)


def predict_fn(model: models.Classifier) -> Callable[[Any, np.ndarray], jax.Array]:
  """A jitted `(variables, uint8 images) -> class probabilities`."""

  @jax.jit
  def predict(variables, images):
    logits = model.apply(variables, images)
    if logits.shape[-1] == 1:  # binary: probability of class 1
      p = jax.nn.sigmoid(logits[:, 0])
      return jax.numpy.stack([1 - p, p], axis=-1)
    return jax.nn.softmax(logits)

  return predict


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
  probs = np.asarray(predict_fn(model)(variables, images))
  return top_k(probs, names, k)


def main(config: ml_collections.ConfigDict, paths: Sequence[str], k: int) -> None:
  """Prints the top-k classes of each image."""
  for path, best in zip(paths, predict_files(config, paths, k)):
    print(f'{path}: ' + ', '.join(f'{name} {p:.4f}' for name, p in best))


if __name__ == '__main__':
  _TOP_K = flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
  cli.run(lambda config, argv: main(config, argv, _TOP_K.value), positional='images')
