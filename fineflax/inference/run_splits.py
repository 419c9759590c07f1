"""A finished run's validation and test splits, ready to evaluate any weights of its model
on: what WiSE-FT (fineflax.inference.interpolate) and soups (fineflax.inference.soup)
measure their candidates with. Evaluation is the training loop's own
(`fineflax.train.step.evaluate`: every example exactly once), so a checkpoint scores here
what it scored in training.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections

from fineflax import data, models
from fineflax.distributed import parallel
from fineflax.errors import ConfigError
from fineflax.inference.evaluate import eval_batch_size
from fineflax.run import RunDir, restore
from fineflax.train import step, training
from fineflax.train.training_run import Inputs


@dataclasses.dataclass(frozen=True)
class RunSplits:
  """A run's model and its splits placed for evaluation (`evaluate(variables, role)`)."""

  workdir: Any
  config: ml_collections.ConfigDict
  model: models.Classifier
  info: data.DatasetInfo
  mesh: jax.sharding.Mesh
  inputs: Inputs
  batch_size: int

  @property
  def abstract(self) -> dict[str, Any]:
    """The abstract {'params', 'batch_stats'} of the run's model."""
    return models.abstract_variables(self.model, self.info.image_shape)

  def has(self, role: str) -> bool:
    return self.inputs.splits.get(role) is not None

  def evaluate(self, variables: dict[str, Any], role: str) -> dict[str, float]:
    """Loss, accuracy and example count of `variables` on the split of `role`."""
    # From the host: arrays on this process's device cannot be sent to other hosts'.
    placed = parallel.replicate(jax.device_get(variables), self.mesh)
    return step.evaluate(
        self.inputs.eval_step,
        placed,
        self.inputs.splits[role],
        self.batch_size,
        self.mesh,
        self.inputs.resident[role],
    )


def open_run_splits(
    workdir: str | os.PathLike,
    roles: Sequence[str] = ('val', 'test'),
    devices: Sequence[jax.Device] | None = None,
) -> RunSplits:
  """The run in `workdir` with the splits of `roles` that its config names, loaded.

  Raises:
    ConfigError: not a run, or a dataset whose classes are not the run's.
  """
  workdir = RunDir(workdir).root
  config = restore.read_config(workdir)
  info = restore.read_dataset_info(workdir)
  model = models.from_config(config, info.class_names)
  keys = [f'{role}_split' for role in roles if config.data[f'{role}_split'] is not None]
  dataset = data.load_dataset(config.data, keys or data.SPLIT_KEYS[:1])
  if tuple(dataset.info.class_names) != tuple(info.class_names):
    raise ConfigError(
        f'{workdir}: the run was trained on the classes {list(info.class_names)} '
        f'but its dataset now has {list(dataset.info.class_names)}'
    )
  splits = {
      role: dataset.splits.get(config.data[f'{role}_split'])
      if config.data[f'{role}_split'] is not None
      else None
      for role in roles
  }
  mesh = parallel.make_mesh(devices)
  inputs = training.place_images(config, model, mesh, splits, data.augment_from_config(config.data))
  size = eval_batch_size(None, config, mesh.devices.size)
  return RunSplits(workdir, config, model, info, mesh, inputs, size)
