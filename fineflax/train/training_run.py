"""What a training run holds while it trains: `TrainingRun` (everything set up before the
first step), `Inputs` (what a phase trains and evaluates on) and `Position` (where the
run stands, as a checkpoint's meta records it)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fineflax import data, models
from fineflax.distributed.preemption import StopRequest
from fineflax.run import RunDir, reporting
from fineflax.run.checkpoints import RunCheckpoints
from fineflax.run.tensorboard import SummaryWriter
from fineflax.train.ema import Ema
from fineflax.train.plan import PhasePlan
from fineflax.train.step import evaluate

logger = logging.getLogger('fineflax.train')


@dataclasses.dataclass
class Inputs:
  """What a phase trains and evaluates on: the image splits, or their cached features.

  Attributes:
    splits: role ('train', 'val', 'test') -> split, or None when the run has none.
    resident: role -> the split placed on the devices, or None (batches come from the host).
    eval_step: the compiled evaluation step of these inputs.
    on_features: whether the splits hold cached features (`fineflax.train.features`).
  """

  splits: dict[str, data.AnySplit | None]
  resident: dict[str, Any]
  eval_step: Callable[..., Any]
  on_features: bool = False


@dataclasses.dataclass
class Position:
  """Where a run stands: what a checkpoint's meta records besides the step."""

  phase_index: int = 0
  phase_epochs_done: int = 0
  epoch: int = 0  # epochs done in the whole run
  batch: int = 0  # batches done in the epoch under way (a mid-epoch save)
  sums: dict[str, float] = dataclasses.field(default_factory=dict)  # their metric sums
  early_stopping: dict[str, Any] = dataclasses.field(default_factory=dict)

  def meta(self, step: int, phase_name: str) -> dict[str, Any]:
    """The checkpoint meta of this position at `step`."""
    return dict(dataclasses.asdict(self), step=step, phase=phase_name)

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> 'Position':
    """The position a checkpoint's meta records."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in names})


def dataset_record(
    dataset: data.Dataset,
    config: ml_collections.ConfigDict,
    splits: dict[str, data.AnySplit | None],
) -> dict[str, Any]:
  """What DIR/dataset.json holds: class names, the stored image shape, and per role the
  split's name, examples and unreadable files skipped."""
  return {
      'class_names': list(dataset.info.class_names),
      'image_shape': list(dataset.info.image_shape),
      'splits': {
          role: {
              'name': config.data[f'{role}_split'],
              'examples': split.size,
              'skipped_files': split.skipped,
          }
          for role, split in splits.items()
          if split is not None
      },
  }


@dataclasses.dataclass
class TrainingRun:
  """Everything a run sets up before its first step (`fineflax.train.training.setup`).

  Attributes:
    config: the validated config.
    folder: the run folder.
    dataset: the dataset (class names, image shape, every split).
    images: the image splits, as every phase that does not cache features trains on them.
    model: the classifier.
    mesh: the devices, as a mesh with the batch axis.
    plans: one plan per phase.
    augment: `config.data.augment`.
    checkpoints: latest/ and best/.
    metrics_log: metrics.jsonl.
    stop: whether a SIGTERM asks the run to stop.
    class_weights: one loss weight per class (`config.loss.class_weight`), or None.
    tensorboard: the TensorBoard writer (process 0, when enabled), or None.
  """

  config: ml_collections.ConfigDict
  folder: RunDir
  dataset: data.Dataset
  images: Inputs
  model: models.Classifier
  mesh: Mesh
  plans: list[PhasePlan]
  augment: data.Augment
  checkpoints: RunCheckpoints
  metrics_log: reporting.MetricsLog
  stop: StopRequest
  class_weights: tuple[float, ...] | None = None
  tensorboard: SummaryWriter | None = None
  # Role -> the unreadable files of a streamed split that dataset.json records.
  unreadable_recorded: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def ema(self) -> Ema | None:
    """The moving average the run keeps (config.ema), if any."""
    return Ema.from_config(self.config)

  @property
  def eval_batch_size(self) -> int:
    return self.config.eval_batch_size or self.config.batch_size

  def evaluate(
      self, variables: dict[str, Any], role: str, on: Inputs | None = None
  ) -> dict[str, float]:
    """Loss, accuracy and count of `variables` on a split (of the images, or of `on`)."""
    on = on or self.images
    return evaluate(
        on.eval_step, variables, on.splits[role], self.eval_batch_size, self.mesh, on.resident[role]
    )

  def record_unreadable(self) -> None:
    """Brings dataset.json up to date with the unreadable files streaming has found.

    A streamed split finds them only as it reads them (the in-memory pipeline reads every
    file before training and leaves them out): their rows train and count nothing, but
    the epoch still has their batches. Said when the count grows. Every process calls it
    at the same point (the files found are gathered).
    """
    found = {
        role: len(_gathered(split.unreadable))
        for role, split in self.images.splits.items()
        if isinstance(split, data.StreamSplit)
    }
    if all(n == self.unreadable_recorded.get(role, 0) for role, n in found.items()):
      return
    record = dataset_record(self.dataset, self.config, self.images.splits)
    for role, count in found.items():
      record['splits'][role]['skipped_files'] = count
      if count != self.unreadable_recorded.get(role, 0):
        size = self.images.splits[role].size
        logger.warning(
            'split %r (%s): %d file(s) found unreadable while streaming (named above): their '
            'rows train and count nothing, so %d of its %d listed examples count (the '
            'in-memory pipeline would leave them out before training); dataset.json updated',
            self.config.data[f'{role}_split'],
            role,
            count,
            size - count,
            size,
        )
    self.unreadable_recorded.update(found)
    reporting.write_json(self.folder.dataset_json, record)

  def close(self) -> None:
    """Waits for pending checkpoint saves; closes the writers."""
    try:
      self.checkpoints.close()
    finally:
      if self.tensorboard is not None:
        self.tensorboard.close()


def _gathered(indices: set[int]) -> set[int]:
  """The union over every process of each one's `indices`."""
  if jax.process_count() == 1:
    return set(indices)
  mine = np.asarray(sorted(indices), np.int64)
  longest = int(np.max(multihost_utils.process_allgather(np.asarray([len(mine)]))))
  padded = np.full(longest, -1, np.int64)
  padded[: len(mine)] = mine
  everyone = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1)
  return {int(i) for i in everyone if i >= 0}
