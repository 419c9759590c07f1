"""What several test files build the same way: small models, a phase's optimizer and
train state."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from fineflax import config as config_lib, models
from fineflax.distributed import parallel
from fineflax.train import optimizers, state as state_lib


def tiny_model(num_classes: int = 10, **model_keys: Any) -> models.Classifier:
  """`resnet_tiny` with a new head of `num_classes` (config.model keys in `model_keys`;
  'head' a dict of head keys)."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  for key, value in model_keys.items():
    if key == 'head':
      cfg.model.head.update(value)
    else:
      cfg.model[key] = value
  return models.build_model(cfg.model, num_classes)


def phase_optimizer(model: models.Classifier, params: Any, freeze: str = 'none',
                    steps_per_epoch: int = 1, **phase_keys: Any) -> optimizers.Optimizer:
  """The optimizer a run builds for a phase with `freeze` and `phase_keys`."""
  phase = config_lib.phase(freeze=freeze, **phase_keys)
  return optimizers.make_optimizer(model, params, phase, steps_per_epoch)


def replicated_state(variables: dict[str, Any], optimizer: optimizers.Optimizer,
                     devices: Sequence[jax.Device], step: int = 0) -> state_lib.TrainState:
  """A new train state of `variables`, replicated over `devices`."""
  mesh = parallel.make_mesh(devices)
  return parallel.replicate(state_lib.create_train_state(variables, optimizer, step), mesh)


def two_train_states() -> tuple[state_lib.TrainState, state_lib.TrainState]:
  """Two train states of resnet_tiny at 16 px, on two devices, that differ in every
  parameter (step 1, nothing frozen, Adam)."""
  model = tiny_model()
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  first = replicated_state(variables, phase_optimizer(model, variables['params']),
                           jax.devices()[:2], step=1)
  return first, first.replace(params=jax.tree.map(lambda x: x * 2 + 1, first.params))
