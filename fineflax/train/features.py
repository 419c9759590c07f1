"""Cached-feature mode: run the frozen network once, then train the head on its output.

A phase that trains only the head, on images that are not augmented, computes the same
backbone output for an image in every epoch. Deep Learning with Python's "fast feature
extraction" runs the base once over the splits and fits the head on the stored
features; fineflax does the same automatically (`config.features.cache`). The stored
features are the output of `Classifier.features` (the backbone in inference mode plus
the head's parameter-free pooling or Flatten layer), kept in float32, which holds
bfloat16 activations exactly, so the head sees the values the uncached step would give
it.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fineflax import data, models
from fineflax.config import registry
from fineflax.data import feed
from fineflax.errors import ConfigError
from fineflax.run import RunDir
from fineflax.train import freeze

logger = logging.getLogger('fineflax.features')

TRAINS_BACKBONE = 'the phase trains backbone parameters'
MODES = ('auto', 'memory', 'disk', 'off')  # config.features.cache

registry.register_choices('features.cache', MODES)


def ineligible_reason(labels: freeze.Labels, augment: data.Augment) -> str | None:
  """Why a phase cannot train on cached features, or None when it can."""
  if any(label == freeze.TRAINABLE for label in jax.tree.leaves(labels['backbone'])):
    return TRAINS_BACKBONE
  if augment.geometric or augment.crop is not None or augment.mixup > 0:
    return 'the training images are augmented'
  if jax.process_count() > 1:
    return 'cached features are single-process only'
  return None


def check_forced(
    mode: str, plans: list[freeze.Labels], augments: list[data.Augment], phase_names: list[str]
) -> None:
  """A forced mode ('memory', 'disk') must apply to some phase: otherwise the config
  asks for something that cannot happen, and says so before anything runs."""
  if mode not in ('memory', 'disk'):
    return
  reasons = [ineligible_reason(labels, aug) for labels, aug in zip(plans, augments)]
  if all(reasons):
    detail = '; '.join(f'{name}: {r}' for name, r in zip(phase_names, reasons))
    raise ConfigError(
        f'config.features.cache={mode!r} but no phase can use cached features ' f'({detail})'
    )


def feature_width(model: models.Classifier, image_shape: tuple[int, int, int]) -> int:
  """The length of one image's feature vector (shapes only, no computation)."""
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
  variables = models.abstract_variables(model, image_shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, images)
  return math.prod(out.shape[1:])


def extract(
    features_step: Callable[..., jax.Array],
    variables: dict[str, Any],
    split: data.AnySplit,
    batch_size: int,
    mesh: Mesh,
    resident: dict[str, jax.Array] | None,
    out: np.ndarray,
) -> np.ndarray:
  """Writes the features of the readable examples of `split`, in order, into the first
  rows of `out`; returns their labels (one per row written).

  A split in memory holds readable examples only; a streamed one finds unreadable files
  as it reads them (their rows have weight 0), and those are left out here, as the
  in-memory pipeline leaves them out of its splits.
  """
  labels = np.empty(len(out), np.int32)
  rows = 0
  batches = list(data.eval_batches(split, batch_size))
  for batch in feed.device_batches(split, batches, mesh, resident):
    values = np.asarray(jax.device_get(features_step(variables, batch, resident or {})), np.float32)
    weight = np.asarray(jax.device_get(batch['weight']))
    label = (
        np.asarray(jax.device_get(batch['label']))
        if 'label' in batch
        else split.labels[np.asarray(jax.device_get(batch['index']))]
    )
    real = weight > 0
    count = int(real.sum())
    out[rows : rows + count] = values.reshape(len(weight), -1)[real]
    labels[rows : rows + count] = label[real]
    rows += count
  return labels[:rows]


def cache_splits(
    mode: str,
    memory_mb: int,
    workdir: str | os.PathLike,
    features_step: Callable[..., jax.Array],
    variables: dict[str, Any],
    splits: Mapping[str, data.AnySplit | None],
    width: int,
    batch_size: int,
    mesh: Mesh,
    resident: Mapping[str, Any],
) -> tuple[dict[str, data.Split | None], bool]:
  """The feature splits of `splits` (in memory or streamed), and whether they are held in
  memory.

  'auto' keeps them in memory up to `memory_mb` in all, else memory-maps .npy files
  under `workdir/features/` ('memory' and 'disk' choose; a local folder named in the
  log when `workdir` is a gs:// URL).
  """
  rows = sum(len(s) for s in splits.values() if s is not None)
  size_mb = rows * width * 4 / 2**20
  in_memory = mode == 'memory' or (mode == 'auto' and size_mb <= memory_mb)
  out: dict[str, data.Split | None] = {}
  for role, split in splits.items():
    if split is None:
      out[role] = None
      continue
    if in_memory:
      array = np.empty((len(split), width), np.float32)
    else:
      folder = RunDir(workdir).features
      folder.mkdir(parents=True, exist_ok=True)
      # A file per role, rewritten by every cached phase: a phase's features depend on
      # the backbone parameters it starts from.
      array = np.lib.format.open_memmap(
          os.fspath(folder / f'{role}.npy'), mode='w+', dtype=np.float32, shape=(len(split), width)
      )
    labels = extract(features_step, variables, split, batch_size, mesh, resident[role], array)
    if not in_memory:
      array.flush()
    out[role] = data.Split(array[: len(labels)], labels, skipped=split.skipped)
  logger.info(
      'cached features: %d examples x %d floats (%.1f MB), %s',
      rows,
      width,
      size_mb,
      'in memory' if in_memory else f'memory-mapped from {RunDir(workdir).features}',
  )
  return out, in_memory
