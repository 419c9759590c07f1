"""A phase, planned once before training starts: its index and config, freeze labels,
optimizer (partitioned by the labels), learning rate, augmentation and BatchNorm mode.

Every plan is built from shapes only, so a freeze spec or optimizer setting that does not
fit the model fails before the run writes anything.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import ml_collections
import optax

from fineflax import data, models
from fineflax.errors import ConfigError
from fineflax.train import freeze, optimizers


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """What one phase trains and how.

  Attributes:
    index: the phase's position in `config.phases`.
    config: the phase's config (`fineflax.config.phase`).
    labels: the freeze label tree: only TRAINABLE leaves get gradients and updates.
    tx: the optimizer, `optax.multi_transform`ed by `labels` (no state for frozen leaves).
    learning_rate: the base learning rate at a step of the phase.
    augment: the augmentation of its training images (none with `augment=False`).
    bn_train: BatchNormalization layers in training mode (empty: all frozen).
  """

  index: int
  config: ml_collections.ConfigDict
  labels: freeze.Labels
  tx: optax.GradientTransformation
  learning_rate: Callable[[int], float]
  augment: data.Augment
  bn_train: frozenset[str]

  @property
  def name(self) -> str:
    return self.config.name


def freeze_labels(model: models.Classifier, image_shape: tuple[int, int, int],
                  phases: Sequence[ml_collections.ConfigDict]) -> list[freeze.Labels]:
  """The label tree of every phase, computed on shapes only; a spec that does not fit
  the model is a ConfigError naming the phase."""
  params = models.abstract_variables(model, image_shape)['params']
  out = []
  for i, phase in enumerate(phases):
    try:
      out.append(freeze.freeze_labels(params, phase.freeze, model.backbone.layers))
    except freeze.FreezeSpecError as e:
      raise ConfigError(f'config.phases[{i}].freeze: {e}') from None
  return out


def plan_phases(config: ml_collections.ConfigDict, model: models.Classifier,
                image_shape: tuple[int, int, int], augment: data.Augment,
                steps_per_epoch: int) -> list[PhasePlan]:
  """The plan of every phase of a validated `config`."""
  batchnorm = frozenset(f'{group}/{layer.name}'
                        for group, layers in model.layer_groups().items()
                        for layer in layers if layer.kind == 'BatchNormalization')
  plans = []
  for index, (phase, labels) in enumerate(zip(config.phases,
                                              freeze_labels(model, image_shape, config.phases))):
    optimizer = optimizers.build_optimizer(phase, steps_per_epoch, batchnorm)
    bn_train = (freeze.bn_train_layers(labels, model.layer_groups())
                if phase.batchnorm == 'train' else frozenset())
    plans.append(PhasePlan(index, phase, labels,
                           freeze.partition_optimizer(optimizer.tx, labels),
                           optimizer.learning_rate,
                           augment if phase.augment else data.Augment(), bn_train))
  return plans
