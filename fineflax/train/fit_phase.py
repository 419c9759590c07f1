"""A phase that fits the head exactly (`phase(fit='logistic' | 'ridge')`): the probe of LP-FT.

The frozen backbone's features of the train and validation splits are computed once (the
cached-feature path, `fineflax.train.features`), the head's Dense layer is fitted on them
(`fineflax.train.linear_probe`, its L2 strength chosen on the validation split), and the
phase ends as a trained phase's epoch does: a record in metrics.jsonl, a checkpoint, the
next phase starting from it. The fit counts as one step and one epoch, so its checkpoint
is a step of its own; a run resumed after it does not fit again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fineflax.config import registry
from fineflax.distributed import parallel
from fineflax.errors import ConfigError
from fineflax.run import reporting
from fineflax.train import ema as ema_lib, inputs, linear_probe, records, state as state_lib
from fineflax.train.plan import PhasePlan
from fineflax.train.training_run import Position, TrainingRun

logger = logging.getLogger('fineflax.train')
# The freeze specs that mean what a fit does (the backbone frozen, the head fitted).
FIT_FREEZE = ('none', 'backbone', 'head')

registry.register_choices('phases.fit', linear_probe.FITS)


def head_dense(run: TrainingRun) -> str:
  """The name of the head's Dense layer, the one a fit replaces."""
  return run.model.head.layers[-1].name


def fit_head(
    run: TrainingRun, plan: PhasePlan, state: state_lib.TrainState, position: Position
) -> state_lib.TrainState:
  """The phase's fit (nothing when a resumed run is past it): the state with the fitted
  head, one step on, recorded and checkpointed."""
  if position.phase_epochs_done >= 1:
    return state
  phase = plan.config
  records.log_summary(run, plan)
  start = time.perf_counter()
  mode = 'disk' if run.config.features.cache == 'disk' else 'memory'
  on = inputs.cached_inputs(run, state.variables, mode)
  extracted = time.perf_counter() - start
  train, val = on.splits['train'], on.splits['val']
  fit = linear_probe.choose_l2(
      phase.fit,
      (train.images, train.labels),
      None if val is None else (val.images, val.labels),
      run.model.head.layers[-1].filters,
      phase.fit_l2,
      run.class_weights,
  )
  seconds = time.perf_counter() - start
  state = with_head(run, state, fit)
  loss, accuracy = linear_probe.score(fit, train.images, train.labels, run.class_weights)
  val_metrics = run.evaluate(state.variables, 'val', on) if val is not None else {}
  position.epoch += 1
  position.phase_epochs_done = 1
  record = {
      'phase': phase.name,
      'phase_index': plan.index,
      'phase_epoch': 1,
      'epoch': position.epoch,
      'step': int(state.step),
      'loss': loss,
      'accuracy': accuracy,
      'val_loss': val_metrics.get('loss'),
      'val_accuracy': val_metrics.get('accuracy'),
      'learning_rate': None,  # no optimizer
      'images_per_sec': len(train.labels) / seconds,
      'fit': {
          'kind': phase.fit,
          'l2': fit.l2,
          'iterations': fit.iterations,
          'seconds': seconds,
          'features_seconds': extracted,
          'grid': list(fit.grid),
      },
  }
  if state.ema is not None:
    # The average restarts at the fitted head: the fit is no step of a trajectory.
    state = state.replace(
        ema=ema_lib.begin(run.ema, plan.optimizer.trainable(state.params), None, state.step, None)
    )
    record.update(val_loss_ema=record['val_loss'], val_accuracy_ema=record['val_accuracy'])
  records.report(run, record)
  logger.info(reporting.epoch_line(record, 1))
  logger.info(fit_line(record))
  if run.checkpoints.save(state, position.meta(record['step'], phase.name), record):
    logger.info(
        'best %s so far: %.4f (checkpoints/best)',
        run.checkpoints.monitor,
        record[run.checkpoints.monitor],
    )
  return state


def fit_line(record: dict[str, Any]) -> str:
  """What the fit did and how long it took, for the log."""
  fit = record['fit']
  grid = fit['grid']
  chosen = f'chosen of {len(grid)} on the validation split' if grid else 'given'
  iterations = f", {fit['iterations']} L-BFGS iterations" if fit['kind'] == 'logistic' else ''
  return (
      f"[{record['phase']}] {fit['kind']} head fitted in {fit['seconds']:.1f} s "
      f"({fit['features_seconds']:.1f} s of it computing the features{iterations}); "
      f"l2 {fit['l2']:g} ({chosen})"
  )


def with_head(
    run: TrainingRun, state: state_lib.TrainState, fit: linear_probe.LinearFit
) -> state_lib.TrainState:
  """`state` with the head's Dense layer set to `fit`, one step on."""
  name = head_dense(run)
  old = state.params['head'][name]
  dense = {
      'kernel': jnp.asarray(fit.kernel, old['kernel'].dtype),
      'bias': jnp.asarray(fit.bias, old['bias'].dtype),
  }
  head = {**state.params['head'], name: parallel.replicate(jax.device_get(dense), run.mesh)}
  return state.replace(params={**state.params, 'head': head}, step=state.step + 1)


def _check_phases(config: ml_collections.ConfigDict) -> None:
  """A fit phase needs a linear head, fits once, and trains nothing but the head."""
  for i, p in enumerate(config.phases):
    fit = p.get('fit')
    if fit is None:
      continue
    key = f'config.phases[{i}]'
    head = config.model.get('head') or {}
    if head.get('hidden') or head.get('batchnorm') or config.model.get('include_top'):
      what = (
          f"config.model.head.hidden={tuple(head.get('hidden'))}"
          if head.get('hidden')
          else 'config.model.head.batchnorm=True'
          if head.get('batchnorm')
          else 'config.model.include_top=True'
      )
      raise ConfigError(
          f'{key}.fit={fit!r} fits a linear head (pooling, dropout, Dense), but {what}'
      )
    if p.get('epochs', 1) != 1:
      raise ConfigError(f"{key}.epochs={p.get('epochs')}: a fit phase fits once (epochs=1)")
    if p.get('freeze', 'none') not in FIT_FREEZE:
      raise ConfigError(
          f"{key}.freeze={p.get('freeze')!r}: a fit phase fits the head alone with the "
          f'backbone frozen (freeze one of {", ".join(FIT_FREEZE)})'
      )
    if p.get('batchnorm', 'frozen') != 'frozen':
      raise ConfigError(
          f"{key}.batchnorm={p.get('batchnorm')!r}: a fit phase runs the backbone in "
          "inference mode (batchnorm='frozen')"
      )


registry.register_config_check('fit phases', _check_phases)
