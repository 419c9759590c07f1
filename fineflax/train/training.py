"""Fine-tuning runs (`python -m fineflax.train --config configs/demo.py --workdir DIR`
runs `train_and_evaluate`; the program is fineflax/cli/train.py).

A run is the list of phases in `config.phases`. Each phase builds its freeze plan and
optimizer and trains for its epochs, keeping the parameters of the phase before. After
every epoch the validation split is evaluated, one JSON record is appended to
`DIR/metrics.jsonl` and the train state is checkpointed under `DIR/checkpoints/`. The same
command started again on the same DIR resumes from the latest checkpoint: same phase,
same epoch, same data order and dropout randomness, so it ends where an uninterrupted run
ends. At the end the test split is evaluated and written to `DIR/results.json`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import jax
import ml_collections

from fineflax import config as config_lib, data, models, weights
from fineflax.data import feed, preview
from fineflax.distributed import parallel
from fineflax.distributed.preemption import StopRequest, sigterm_flag
from fineflax.errors import ConfigError
from fineflax.run import RunDir, checkpoints, reporting, restore, tensorboard
from fineflax.train import features, loop as phases, plan, state as state_lib
from fineflax.train import step as step_lib

logger = logging.getLogger('fineflax.train')  # not __name__: '__main__' under -m


def dataset_splits(dataset: data.Dataset,
                   data_config: ml_collections.ConfigDict) -> dict[str, data.Split | None]:
  """The train / val / test splits named by `config.data` (None: not set, or a test split
  the source may do without and did not find)."""
  out: dict[str, data.Split | None] = {}
  for role in ('train', 'val', 'test'):
    name = data_config[f'{role}_split']
    if name is not None and name not in dataset.splits and name not in dataset.absent:
      raise ConfigError(f'config.data.{role}_split={name!r}: the dataset has the splits '
                        f'{sorted(dataset.splits)}')
    out[role] = dataset.splits.get(name) if name is not None else None
  return out


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
  workdir = RunDir(workdir).root
  folder = RunDir(workdir)
  fresh = not checkpoints.has_checkpoint(folder.latest)
  # The weight file is looked up before the photos are decoded: a missing one is said at
  # once, not after minutes of decoding.
  weight_file = (weights.resolve(config.model.weights, config.model.backbone,
                                 config.model.include_top)
                 if fresh and config.model.weights else None)
  dataset = data.load_dataset(config.data)
  splits = dataset_splits(dataset, config.data)
  model = models.from_config(config, dataset.info.class_names)
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(config.eval_batch_size or config.batch_size, mesh,
                            'config.eval_batch_size')
  augment = data.augment_from_config(config.data)
  plans = plan.plan_phases(config, model, dataset.info.image_shape, augment,
                           data.num_batches(splits['train'], config.batch_size))
  features.check_forced(config.features.cache, [p.labels for p in plans],
                        [p.augment for p in plans], [p.name for p in plans])
  weighting = data.class_weights(config.loss.class_weight, splits['train'],
                                 len(dataset.info.class_names))
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
  if weight_file is not None:
    variables, report = weights.load_pretrained(config.model, model, variables, weight_file)
    logger.info(report.text())
  if fresh and config.init_from:
    source = restore.init_from_folder(config.init_from)
    variables, report = weights.load_variables(weights.read_variable_tree(source), model,
                                               variables, f'init_from {source}')
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
  changes = (config_lib.changes_on_resume(json.loads(saved.read_text()), config)
             if resume is not None and saved.exists() else [])
  if changes and config.allow_config_change:
    logger.warning('resuming with a changed config (config.allow_config_change): %s',
                   '; '.join(changes))
  elif changes:
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
    state = None
    try:
      for phase in run.plans[position.phase_index:]:
        if phase.index != position.phase_index:  # a new phase
          position = phases.Position(phase_index=phase.index, epoch=position.epoch)
        state = phases.start_state(run, phase, state, variables, resume)
        state = phases.train_phase(run, phase, state, position)
      best = run.ckpts.best.latest_meta()
    finally:
      run.ckpts.close()
      if run.tb is not None:
        run.tb.close()
  return finish(run, state, position, best)


def _test_metrics(run: phases.Run, variables: dict[str, Any]) -> dict[str, Any]:
  test = step_lib.evaluate(run.images.eval_step, variables, run.images.splits['test'],
                         run.eval_batch_size, run.mesh, run.images.resident['test'])
  return {'test_loss': test['loss'], 'test_accuracy': test['accuracy'],
          'test_examples': test['count']}


def finish(run: phases.Run, state: state_lib.TrainState, position: phases.Position,
           best: dict[str, Any] | None) -> dict[str, Any]:
  """The end of a run: the test split evaluated with the final parameters and, when it is
  another step, with the best checkpoint (each labelled), results.json, and a summary.

  results.json: {'step', 'epoch', 'test_loss', 'test_accuracy', 'test_examples'} of the
  final parameters (without a test split: no test keys), and 'final' and 'best' records
  ({'checkpoint', 'step', 'dir' (relative to the run folder), test metrics...}) naming what
  each figure measured.
  """
  folder = RunDir(run.workdir)
  step = int(state.step)
  results: dict[str, Any] = {'step': step, 'epoch': position.epoch}
  final = {'checkpoint': 'final parameters', 'step': step}
  has_test = run.images.splits['test'] is not None
  if has_test:
    final.update(_test_metrics(run, state.variables))
    results.update({k: final[k] for k in ('test_loss', 'test_accuracy', 'test_examples')})
  results['final'] = final
  if best is not None:
    # The folder relative to the run folder: results.json moves with it.
    record = {'checkpoint': 'best', 'step': best['step'],
              'dir': str((folder.best / str(best['step'])).relative_to(folder.root)),
              'monitor': best['monitor'], 'value': best['value']}
    if has_test and best['step'] != step:
      variables, _ = restore.read_variables(
          folder.best / str(best['step']),
          models.abstract_variables(run.model, run.dataset.info.image_shape))
      # From the host: arrays on this process's device cannot be sent to other hosts'.
      record.update(_test_metrics(run, parallel.replicate(jax.device_get(variables),
                                                          run.mesh)))
    results['best'] = record
  reporting.write_json(folder.results_json, results)
  if jax.process_index() == 0:
    logger.info(reporting.run_summary(folder, results, run.metrics_log.read()))
  return results
