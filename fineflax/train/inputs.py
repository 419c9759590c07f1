"""What a phase trains on: the images, or, when it trains only the head on images that are
not augmented (or fits it, `fineflax.train.fit_phase`), their features computed once
(`fineflax.train.features`), with the evaluation step of each."""

from __future__ import annotations

import logging
import time
from typing import Any

from fineflax.data import feed
from fineflax.train import features, state as state_lib, step as step_lib
from fineflax.train.plan import PhasePlan
from fineflax.train.training_run import Inputs, TrainingRun

logger = logging.getLogger('fineflax.train')


def phase_inputs(run: TrainingRun, plan: PhasePlan, state: state_lib.TrainState) -> Inputs:
  """The images, or the features of the phase's starting parameters when it can use them
  (in memory or streamed)."""
  cfg = run.config
  mode = cfg.features.cache
  if mode == 'off':
    return run.images
  reason = features.ineligible_reason(plan.labels, plan.augment)
  if reason:
    # Said at INFO only where the head alone trains: there the reason is news.
    level = logging.DEBUG if reason == features.TRAINS_BACKBONE else logging.INFO
    logger.log(level, '[%s] trains on the images (no cached features: %s)', plan.name, reason)
    return run.images
  start = time.perf_counter()
  on = cached_inputs(run, state.variables, mode)
  logger.info(
      '[%s] trains the head on cached features (%.1f s to compute them)',
      plan.name,
      time.perf_counter() - start,
  )
  return on


def cached_inputs(run: TrainingRun, variables: dict[str, Any], mode: str) -> Inputs:
  """The train and validation splits' features under `variables` (`mode`: 'memory',
  'disk' or 'auto', as config.features.cache), with their evaluation step."""
  cfg = run.config
  width = features.feature_width(run.model, run.dataset.info.image_shape)
  extract = step_lib.make_features_step(run.model, run.mesh, augment=run.augment)
  # The test split is evaluated once, at the end of the run, on the images.
  roles = {role: run.images.splits[role] for role in ('train', 'val')}
  splits, in_memory = features.cache_splits(
      mode,
      cfg.features.memory_mb,
      run.folder,
      extract,
      variables,
      roles,
      width,
      run.eval_batch_size,
      run.mesh,
      run.images.resident,
  )
  resident = feed.place_splits(
      splits, run.mesh, cfg.data.device_resident and in_memory, cfg.data.device_resident_max_mb
  )
  eval_step = step_lib.make_eval_step(
      run.model, run.mesh, on_features=True, label_smoothing=cfg.loss.label_smoothing
  )
  return Inputs(splits, resident, eval_step, on_features=True)
