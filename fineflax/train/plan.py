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
    groups: its learning-rate groups (`freeze.param_groups`): `labels` refined by
      lr_groups and layer_decay into one optimizer group per multiplier.
    groups_text: the groups and their sizes (`describe_groups`), logged as the phase
      starts; '' with one learning rate.
  """

  index: int
  config: ml_collections.ConfigDict
  labels: freeze.Labels
  tx: optax.GradientTransformation
  learning_rate: Callable[[int], float]
  augment: data.Augment
  bn_train: frozenset[str]
  groups: freeze.ParamGroups | None = None
  groups_text: str = ''

  @property
  def name(self) -> str:
    return self.config.name


def phase_groups(model: models.Classifier, backbone: str, image_shape: tuple[int, int, int],
                 phases: Sequence[ml_collections.ConfigDict]) -> list[freeze.ParamGroups]:
  """The parameter groups of every phase (freeze, lr_groups, layer_decay), computed on
  shapes only; a spec that does not fit the model is a ConfigError naming the phase."""
  params = models.abstract_variables(model, image_shape)['params']
  stages = models.layer_stages(backbone, model.backbone.layers)
  out = []
  for i, phase in enumerate(phases):
    try:
      out.append(freeze.param_groups(params, phase.freeze, model.backbone.layers,
                                     phase.get('lr_groups') or (), phase.get('layer_decay'),
                                     stages))
    except freeze.FreezeSpecError as e:
      # Errors of lr_groups start with their key ('lr_groups[1]: ...'), the spec's do not.
      key = 'freeze: ' if str(e).startswith('freeze spec') else ''
      raise ConfigError(f'config.phases[{i}].{key}{e}') from None
  return out


def describe_groups(groups: freeze.ParamGroups, params: freeze.Params) -> str:
  """'x1: 5,130, x0.5: 378,112, ..., frozen: 4,832 params': the groups' sizes."""
  sizes = freeze.group_sizes(params, groups.groups)
  parts = [f'x{m:g}: {sizes[label]:,}' for label, m in groups.multipliers.items()]
  return ', '.join(parts + [f'frozen: {sizes.get(freeze.FROZEN, 0):,}']) + ' params'


def plan_phases(config: ml_collections.ConfigDict, model: models.Classifier,
                image_shape: tuple[int, int, int], augment: data.Augment,
                steps_per_epoch: int) -> list[PhasePlan]:
  """The plan of every phase of a validated `config`."""
  batchnorm = frozenset(f'{group}/{layer.name}'
                        for group, layers in model.layer_groups().items()
                        for layer in layers if layer.kind == 'BatchNormalization')
  params = models.abstract_variables(model, image_shape)['params']
  plans = []
  for index, (phase, groups) in enumerate(zip(
      config.phases, phase_groups(model, config.model.backbone, image_shape, config.phases))):
    optimizer = optimizers.build_optimizer(phase, steps_per_epoch, batchnorm, groups)
    labels = groups.labels
    bn_train = (freeze.bn_train_layers(labels, model.layer_groups())
                if phase.batchnorm == 'train' else frozenset())
    text = describe_groups(groups, params) if groups.discriminative else ''
    plans.append(PhasePlan(index, phase, labels,
                           freeze.partition_optimizer(optimizer.tx, labels),
                           optimizer.learning_rate,
                           augment if phase.augment else data.Augment(), bn_train, groups,
                           text))
  return plans
