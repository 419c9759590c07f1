"""A phase, planned once before training starts: its index and config, optimizer (with
the freeze labels and learning-rate groups), augmentation and BatchNorm mode.

Every plan is built from shapes only, so a freeze spec or optimizer setting that does not
fit the model fails before the run writes anything.
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from fineflax import data, models
from fineflax.config import registry
from fineflax.config.smoke import with_values
from fineflax.errors import ConfigError
from fineflax.train import freeze, optimizers

# config.phases[i].batchnorm: 'train' runs the BN layers of trainable scale/offset in
# training mode (`freeze.bn_train_layers`).
BATCHNORM_MODES = ('frozen', 'train')
registry.register_choices('phases.batchnorm', BATCHNORM_MODES)


@dataclasses.dataclass(frozen=True)
class PhasePlan:
  """What one phase trains and how.

  Attributes:
    index: the phase's position in `config.phases`.
    config: the phase's config (`fineflax.config.phase`).
    optimizer: its optimizer; `optimizer.labels` says which leaves train.
    augment: the augmentation of its training images (none with `augment=False`).
    bn_train: BatchNormalization layers in training mode (empty: all frozen).
    groups_text: its learning-rate groups and their sizes, logged as the phase starts;
      '' with one learning rate.
  """

  index: int
  config: ml_collections.ConfigDict
  optimizer: optimizers.Optimizer
  augment: data.Augment
  bn_train: frozenset[str]
  groups_text: str = ''

  @property
  def name(self) -> str:
    return self.config.name

  @property
  def labels(self) -> freeze.Labels:
    """TRAINABLE / FROZEN at every parameter."""
    return self.optimizer.labels


def plan_phases(
    config: ml_collections.ConfigDict,
    model: models.Classifier,
    image_shape: tuple[int, int, int],
    augment: data.Augment,
    steps_per_epoch: int,
) -> list[PhasePlan]:
  """The plan of every phase of a validated `config`."""
  params = models.abstract_variables(model, image_shape)['params']
  plans = []
  for index, phase in enumerate(config.phases):
    if phase.fit:
      if jax.process_count() > 1:
        raise ConfigError(
            f'config.phases[{index}].fit={phase.fit!r}: fit phases run in one process'
        )
      # What a fit does: the backbone frozen, the head fitted (fineflax.train.fit_phase).
      phase = with_values(phase, freeze='backbone')
    optimizer = optimizers.make_optimizer(model, params, phase, steps_per_epoch, index)
    groups = optimizer.groups
    bn_train = (
        freeze.bn_train_layers(groups.labels, model.layer_groups())
        if phase.batchnorm == 'train'
        else frozenset()
    )
    text = optimizers.describe_groups(groups, params) if groups.discriminative else ''
    plans.append(
        PhasePlan(
            index, phase, optimizer, augment if phase.augment else data.Augment(), bn_train, text
        )
    )
  return plans
