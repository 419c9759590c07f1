"""Fine-tuning runs: `python -m fineflax.train --config configs/demo.py --workdir DIR`.

A run is the list of phases in `config.phases`. Each phase builds its freeze plan and
optimizer and trains for its epochs, keeping the parameters of the phase before. After
every epoch the validation split is evaluated, one JSON record is appended to
`DIR/metrics.jsonl` and the train state is checkpointed under `DIR/checkpoints/`. The same
command started again on the same DIR resumes from the latest checkpoint: same phase,
same epoch, same data order and dropout randomness, so it ends where an uninterrupted run
ends. At the end the test split is evaluated and written to `DIR/results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from fineflax import checkpoints, cli, config as config_lib, data, features, freeze, models
from fineflax import optimizers, parallel, phases, reporting, state as state_lib
from fineflax import step as step_lib, tensorboard, weights
from fineflax.data import feed, preview
from fineflax.errors import ConfigError
from fineflax.preemption import Preempted, StopRequest, sigterm_flag
from fineflax.run import RunDir

logger = logging.getLogger('fineflax.train')  # not __name__: '__main__' under -m


def dataset_splits(dataset: data.Dataset,
                   data_config: ml_collections.ConfigDict) -> dict[str, data.Split | None]:
  """The train / val / test splits named by `config.data` (test: None when not set)."""
  out: dict[str, data.Split | None] = {}
  for role in ('train', 'val', 'test'):
    name = data_config[f'{role}_split']
    if name is not None and name not in dataset.splits:
      raise ConfigError(f'config.data.{role}_split={name!r}: the dataset has the splits '
                        f'{sorted(dataset.splits)}')
    out[role] = dataset.splits[name] if name is not None else None
    if name is not None:
      logger.info('%s split %r: %d examples', role, name, len(dataset.splits[name]))
  return out


def freeze_plans(model: models.Classifier, image_shape: tuple[int, int, int],
                 phases: Sequence[ml_collections.ConfigDict]) -> list[freeze.Labels]:
  """The label tree of every phase, computed on shapes only: a spec that does not fit
  the model fails here, before any training."""
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), np.uint8)
  params = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  plans = []
  for i, phase in enumerate(phases):
    try:
      plans.append(freeze.freeze_labels(params, phase.freeze, model.backbone.layers))
    except freeze.FreezeSpecError as e:
      raise ConfigError(f'config.phases[{i}].freeze: {e}') from None
  return plans


def check_monitors(config: ml_collections.ConfigDict,
                   splits: dict[str, data.Split | None]) -> None:
  """Early stopping that watches a validation metric needs a validation split; said
  before the first epoch rather than after it."""
  if splits['val'] is not None:
    return
  for i, p in enumerate(config.phases):
    watched = p.early_stopping.patience or p.early_stopping.restore_best
    if watched and p.early_stopping.monitor.startswith('val_'):
      raise ConfigError(f'config.phases[{i}].early_stopping.monitor='
                        f'{p.early_stopping.monitor!r} but config.data.val_split is None')


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          devices: Sequence[jax.Device] | None, stop: StopRequest
          ) -> tuple[phases.Run, dict[str, Any] | None, dict[str, Any]]:
  """Validates and builds everything; returns the run, the checkpoint meta it resumes
  from (None for a new run) and the initial variables."""
  config = config_lib.validate(config)
  dataset = data.load_dataset(config.data)
  splits = dataset_splits(dataset, config.data)
  model = models.from_config(config, dataset.info.class_names)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size or config.batch_size, mesh,
                            'config.eval_batch_size')
  plans = freeze_plans(model, dataset.info.image_shape, config.phases)
  augment = data.augment_from_config(config.data)
  features.check_forced(config.features.cache, plans,
                        [augment if p.augment else data.Augment() for p in config.phases],
                        [p.name for p in config.phases])
  weighting = data.class_weights(config.loss.class_weight, splits['train'],
                                 len(dataset.info.class_names))
  workdir = Path(workdir)
  folder = RunDir(workdir)
  fresh = not checkpoints.has_checkpoint(folder.latest)
  if fresh and checkpoints.has_checkpoint(folder.best):
    raise ConfigError(f'{folder.best} holds a checkpoint but '
                      f'{folder.latest} has none to resume from (was it '
                      'deleted?); a new run would mix its best/ with the old one: move the '
                      'folder away or use another workdir')
  check_monitors(config, splits)
  # Initial parameters, with the weight file or the run they come from, before the run
  # writes anything: a missing or foreign file fails here. A run that will resume
  # restores its own parameters instead.
  variables = state_lib.init_variables(model, dataset.info.image_shape, config.seed)
  if fresh and config.model.weights:
    variables, report = weights.load_pretrained(
        config.model, model, variables,
        weights.resolve(config.model.weights, config.model.backbone, config.model.include_top))
    logger.info(report.text())
  if fresh and config.init_from:
    variables, report = weights.load_run(config.init_from, model, variables)
    logger.info(report.text())

  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = checkpoints.RunCheckpoints(workdir, config.checkpoint.keep, config.checkpoint.monitor,
                                     config.checkpoint.mode)
  resume = ckpts.latest.latest_meta()
  if resume is not None and resume['phase_index'] >= len(config.phases):
    raise ConfigError(f'{workdir} holds a run at phase {resume["phase_index"]} '
                      f'({resume["phase"]!r}) but the config has {len(config.phases)} phases')
  if resume is not None:
    logger.info('resuming from step %d: phase %r, %d epoch(s) and %d batch(es) of it done',
                resume['step'], resume['phase'], resume['phase_epochs_done'],
                resume.get('batch', 0))
  saved = folder.config_json
  if resume is not None and saved.exists() and not config.allow_config_change:
    changes = config_lib.changes_on_resume(json.loads(saved.read_text()), config)
    if changes:
      raise ConfigError(f'{workdir} holds a run of another config; resuming it with this one '
                        f'would mix the two ({"; ".join(changes[:5])}'
                        f'{f"; and {len(changes) - 5} more" if len(changes) > 5 else ""}). '
                        'Use another workdir, or set config.allow_config_change=True')
  reporting.write_json(saved, config_lib.to_dict(config))
  reporting.write_json(folder.dataset_json, {
      'class_names': list(dataset.info.class_names),
      'image_shape': list(dataset.info.image_shape),
      'splits': {role: {'name': config.data[f'{role}_split'], 'examples': split.size,
                        'skipped_files': split.skipped}
                 for role, split in splits.items() if split is not None}})
  metrics_log = reporting.MetricsLog(workdir)
  # Records after the checkpoint resumed from belong to epochs that will be redone.
  metrics_log.truncate_after(resume['step'] if resume else -1)

  resident = feed.place_splits(splits, mesh, config.data.device_resident,
                               config.data.device_resident_max_mb)
  samples = folder.samples_png
  if jax.process_index() == 0 and not samples.exists():
    preview.write_samples(samples, splits['train'], dataset.info.class_names, augment,
                          model.image_size, config.seed)
  eval_step = step_lib.make_eval_step(model, mesh, label_smoothing=config.loss.label_smoothing,
                                      augment=augment)
  tb = (tensorboard.SummaryWriter(folder.tensorboard)
        if config.report.tensorboard and jax.process_index() == 0 else None)
  run = phases.Run(config, workdir, dataset, phases.Feed(splits, resident, eval_step), model,
                   mesh, plans, augment, ckpts, metrics_log, stop, weighting, tb)
  return run, resume, variables


def _batchnorm_layers(model: models.Classifier) -> frozenset[str]:
  return frozenset(f'{group}/{layer.name}' for group, layers in model.layer_groups().items()
                   for layer in layers if layer.kind == 'BatchNormalization')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Runs (or resumes) every phase of `config` in `workdir`; returns the test metrics.

  Args:
    config: the experiment; validated, with every phase's freeze spec, before anything
      is written.
    workdir: the run directory; a checkpoint in it is resumed from, mid-epoch if it was
      saved there.
    devices: devices to train on (default: every device of every process).
  Raises:
    Preempted: a SIGTERM arrived; the state was saved.
  """
  with sigterm_flag() as stop:
    run, resume, variables = setup(config, workdir, devices, stop)
    position = phases.Position.from_meta(resume) if resume else phases.Position()
    steps_per_epoch = data.num_batches(run.images.splits['train'], run.config.batch_size)
    state = None
    try:
      for index, phase in enumerate(run.config.phases):
        if resume and index < resume['phase_index']:
          continue
        if index != position.phase_index:  # a new phase
          position = phases.Position(phase_index=index, epoch=position.epoch)
        optimizer = optimizers.build_optimizer(phase, steps_per_epoch,
                                               _batchnorm_layers(run.model))
        tx = freeze.partition_optimizer(optimizer.tx, run.plans[index])
        state = phases.phase_state(run, index, state, variables, tx, resume)
        state = phases.train_phase(run, index, state, position,
                                   dataclasses.replace(optimizer, tx=tx))
    finally:
      run.ckpts.close()
      if run.tb is not None:
        run.tb.close()

  results: dict[str, Any] = {'step': int(state.step), 'epoch': position.epoch}
  if run.images.splits['test'] is not None:
    test = run.evaluate(state, 'test')
    results.update(test_loss=test['loss'], test_accuracy=test['accuracy'],
                   test_examples=test['count'])
  reporting.write_json(RunDir(run.workdir).results_json, results)
  return results


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` in `workdir` and prints the test accuracy."""
  try:
    results = train_and_evaluate(config, workdir)
  except Preempted as e:
    logger.warning('%s', e)
    sys.exit(143)  # 128 + SIGTERM: stopped, not finished
  if 'test_accuracy' in results and jax.process_index() == 0:  # one line per job
    print(f"test_accuracy: {results['test_accuracy']:.4f} "
          f"({results['test_examples']} examples, test_loss {results['test_loss']:.4f})")


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, metrics).')
  cli.run(lambda config: main(config, _WORKDIR.value), required=('config', 'workdir'))
