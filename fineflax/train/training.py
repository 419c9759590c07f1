"""Fine-tuning runs (`python -m fineflax.train --config configs/demo.py --workdir DIR`
runs `train_and_evaluate`; the program is fineflax/cli/train.py).

A run is the list of phases in `config.phases`. Each phase builds its freeze plan and
optimizer and trains for its epochs, keeping the parameters of the phase before. After
every epoch the validation split is evaluated, one JSON record is appended to
`DIR/metrics.jsonl` and the train state is checkpointed under `DIR/checkpoints/`. The same
command started again on the same DIR resumes from the latest checkpoint: same phase,
same epoch, same data order and dropout randomness, so it ends where an uninterrupted run
ends. At the end the validation and test splits are evaluated and written to
`DIR/results.json`.
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
from fineflax.train import (
    features,
    fit_phase,
    loop,
    plan as plan_lib,
    state as state_lib,
    step as step_lib,
    wise_ft,
)
from fineflax.train.training_run import Inputs, Position, TrainingRun, dataset_record

logger = logging.getLogger('fineflax.train')

Splits = dict[str, data.AnySplit | None]  # role ('train', 'val', 'test') -> split


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Runs (or resumes) every phase of `config` in `workdir`; returns results.json's record.

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
    position = Position.from_meta(resume) if resume else Position()
    state = None
    try:
      for plan in run.plans[position.phase_index :]:
        if plan.index != position.phase_index:  # a new phase
          position = Position(phase_index=plan.index, epoch=position.epoch)
        state = loop.start_state(run, plan, state, variables, resume)
        if plan.config.fit:
          state = fit_phase.fit_head(run, plan, state, position)
        else:
          state = loop.train_phase(run, plan, state, position)
        loop.end_phase(run, plan, state)
      best = run.checkpoints.best.latest_meta()
    finally:
      run.close()
  results = report_results(run, state, position, best)
  if config.wise_ft.enabled:
    results['wise_ft'] = interpolate(run)
  return results


def interpolate(run: TrainingRun) -> dict[str, Any]:
  """WiSE-FT at the end of a run (config.wise_ft): its record in results.json."""

  def evaluate(variables: dict[str, Any], role: str) -> dict[str, float]:
    # From the host: arrays on this process's device cannot be sent to other hosts'.
    return run.evaluate(parallel.replicate(jax.device_get(variables), run.mesh), role)

  return wise_ft.run_wise_ft(
      run.folder,
      run.config,
      models.abstract_variables(run.model, run.dataset.info.image_shape),
      evaluate,
      run.images.splits['test'] is not None,
  )


def setup(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    devices: Sequence[jax.Device] | None,
    stop: StopRequest,
) -> tuple[TrainingRun, dict[str, Any] | None, dict[str, Any]]:
  """Validates and builds everything; returns the run, the checkpoint meta it resumes
  from (None for a new run) and the initial variables. Nothing is written before every
  check has passed and the initial parameters are loaded."""
  config = config_lib.validate(config)
  folder = RunDir(workdir)
  fresh = not checkpoints.has_checkpoint(folder.latest)
  weight_file = find_weight_file(config, fresh)
  dataset, splits = load_data(config)
  model = models.from_config(config, dataset.info.class_names)
  mesh = make_mesh(config, devices)
  augment = data.augment_from_config(config.data)
  plans = plan_phases(config, model, dataset, splits, augment)
  class_weights = data.class_weights(
      config.loss.class_weight, splits['train'], len(dataset.info.class_names)
  )
  check_before_writing(config, folder, fresh, splits)
  variables = initial_variables(config, model, dataset.info.image_shape, weight_file, fresh)
  run_checkpoints, resume = open_checkpoints(config, folder)
  write_run_files(config, folder, dataset, splits, resume)
  metrics_log = reporting.MetricsLog(folder.root)
  # Records after the checkpoint resumed from belong to epochs that will be redone.
  metrics_log.truncate_after(resume['step'] if resume else -1)
  images = place_images(config, model, mesh, splits, augment)
  if jax.process_index() == 0 and not folder.samples_png.exists():
    preview.write_samples(
        folder.samples_png,
        splits['train'],
        dataset.info.class_names,
        augment,
        model.image_size,
        config.seed,
    )
  run = TrainingRun(
      config=config,
      folder=folder,
      dataset=dataset,
      images=images,
      model=model,
      mesh=mesh,
      plans=plans,
      augment=augment,
      checkpoints=run_checkpoints,
      metrics_log=metrics_log,
      stop=stop,
      class_weights=class_weights,
      tensorboard=(
          tensorboard.SummaryWriter(folder.tensorboard)
          if config.report.tensorboard and jax.process_index() == 0
          else None
      ),
  )
  return run, resume, variables


def find_weight_file(config: ml_collections.ConfigDict, fresh: bool) -> Any:
  """The pretrained weight file of a new run (None: none, or a run that resumes), looked
  up before the data is read: a missing one is said at once, not after minutes of
  decoding."""
  if not (fresh and config.model.weights):
    return None
  return weights.resolve(config.model.weights, config.model.backbone, config.model.include_top)


def load_data(config: ml_collections.ConfigDict) -> tuple[data.Dataset, Splits]:
  """The dataset and its train / val / test splits (None: not set, or a test split the
  source may do without and did not find). A streamed folder without
  `config.data.load_size` is delivered at the model's input size, which the config then
  records (config.json, so that evaluation reads it as training did)."""
  dataset = data.load_dataset(config.data, stream_size=models.input_size(config.model))
  streamed = any(isinstance(s, data.StreamSplit) for s in dataset.splits.values())
  if streamed and config.data.load_size is None:
    config.data.load_size = dataset.info.image_shape[0]
  splits: Splits = {}
  for role in ('train', 'val', 'test'):
    name = config.data[f'{role}_split']
    if name is not None and name not in dataset.splits and name not in dataset.absent:
      raise ConfigError(
          f'config.data.{role}_split={name!r}: the dataset has the splits '
          f'{sorted(dataset.splits)}'
      )
    splits[role] = dataset.splits.get(name) if name is not None else None
  return dataset, splits


def make_mesh(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None
) -> jax.sharding.Mesh:
  """The device mesh, checked to divide the batch sizes."""
  mesh = parallel.make_mesh(devices)
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(
      config.eval_batch_size or config.batch_size, mesh, 'config.eval_batch_size'
  )
  return mesh


def plan_phases(
    config: ml_collections.ConfigDict,
    model: models.Classifier,
    dataset: data.Dataset,
    splits: Splits,
    augment: data.Augment,
) -> list[plan_lib.PhasePlan]:
  """Every phase's plan (freeze labels, optimizer), from shapes only; a forced
  cached-feature mode no phase can use is refused here."""
  plans = plan_lib.plan_phases(
      config,
      model,
      dataset.info.image_shape,
      augment,
      data.num_batches(splits['train'], config.batch_size),
  )
  features.check_forced(
      config.features.cache,
      [p.labels for p in plans],
      [p.augment for p in plans],
      [p.name for p in plans],
  )
  return plans


def check_before_writing(
    config: ml_collections.ConfigDict, folder: RunDir, fresh: bool, splits: Splits
) -> None:
  """What would make the run fail after it started writing, refused before: a best/
  checkpoint without a latest/ one, or early stopping on a validation metric without a
  validation split."""
  if fresh and checkpoints.has_checkpoint(folder.best):
    raise ConfigError(
        f'{folder.best} holds a checkpoint but {folder.latest} has none to '
        'resume from (was it deleted?); a new run would mix its best/ with the '
        'old one: move the folder away or use another workdir'
    )
  if splits['val'] is not None:
    return
  for i, p in enumerate(config.phases):
    watched = p.early_stopping.patience or p.early_stopping.restore_best
    if watched and p.early_stopping.monitor.startswith('val_'):
      raise ConfigError(
          f'config.phases[{i}].early_stopping.monitor='
          f'{p.early_stopping.monitor!r} but config.data.val_split is None'
      )


def initial_variables(
    config: ml_collections.ConfigDict,
    model: models.Classifier,
    image_shape: tuple[int, int, int],
    weight_file: Any,
    fresh: bool,
) -> dict[str, Any]:
  """The run's first parameters: initialised, then the pretrained weight file or the run
  `config.init_from` names (a new run only: a run that resumes restores its own)."""
  variables = state_lib.init_variables(model, image_shape, config.seed)
  if weight_file is not None:
    variables, report = weights.load_pretrained(config.model, model, variables, weight_file)
    logger.info(report.text())
  if fresh and config.init_from:
    source = restore.init_from_folder(config.init_from)
    ema = config.init_from_weights == 'ema'
    variables, report = weights.load_variables(
        restore.init_from_variables(source, ema=ema),
        model,
        variables,
        f'init_from {source}' + (' (its EMA weights)' if ema else ''),
    )
    logger.info(report.text())
  return variables


def open_checkpoints(
    config: ml_collections.ConfigDict, folder: RunDir
) -> tuple[checkpoints.RunCheckpoints, dict[str, Any] | None]:
  """The run's checkpoint folders, and the meta of the checkpoint it resumes from (None:
  a new run); refuses a checkpoint of a phase the config does not have."""
  folder.root.mkdir(parents=True, exist_ok=True)
  ckpt = config.checkpoint
  opened = checkpoints.RunCheckpoints(folder.root, ckpt.keep, ckpt.monitor, ckpt.mode)
  resume = opened.latest.latest_meta()
  if resume is not None and resume['phase_index'] >= len(config.phases):
    opened.close()
    raise ConfigError(
        f'{folder.root} holds a run at phase {resume["phase_index"]} '
        f'({resume["phase"]!r}) but the config has {len(config.phases)} phases'
    )
  if resume is not None:
    logger.info(
        'resuming from step %d: phase %r, %d epoch(s) and %d batch(es) of it done',
        resume['step'],
        resume['phase'],
        resume['phase_epochs_done'],
        resume.get('batch', 0),
    )
  return opened, resume


def write_run_files(
    config: ml_collections.ConfigDict,
    folder: RunDir,
    dataset: data.Dataset,
    splits: Splits,
    resume: dict[str, Any] | None,
) -> None:
  """config.json and dataset.json; a run resumed with another config than its
  config.json's is refused (or, with `config.allow_config_change`, warned of)."""
  saved = folder.config_json
  changes = (
      config_lib.changes_on_resume(json.loads(saved.read_text()), config)
      if resume is not None and saved.exists()
      else []
  )
  if changes and config.allow_config_change:
    logger.warning(
        'resuming with a changed config (config.allow_config_change): %s', '; '.join(changes)
    )
  elif changes:
    more = f'; and {len(changes) - 5} more' if len(changes) > 5 else ''
    raise ConfigError(
        f'{folder.root} holds a run of another config; resuming it with this '
        f'one would mix the two ({"; ".join(changes[:5])}{more}). Use another '
        'workdir, or set config.allow_config_change=True'
    )
  reporting.write_json(saved, config_lib.to_dict(config))
  reporting.write_json(folder.dataset_json, dataset_record(dataset, config, splits))


def place_images(
    config: ml_collections.ConfigDict,
    model: models.Classifier,
    mesh: Any,
    splits: Splits,
    augment: data.Augment,
) -> Inputs:
  """The image splits, placed on the devices when they fit, and their evaluation step."""
  resident = feed.place_splits(
      splits, mesh, config.data.device_resident, config.data.device_resident_max_mb
  )
  eval_step = step_lib.make_eval_step(
      model, mesh, label_smoothing=config.loss.label_smoothing, augment=augment
  )
  return Inputs(splits, resident, eval_step)


def _metrics(run: TrainingRun, variables: dict[str, Any]) -> dict[str, Any]:
  """Loss, accuracy and examples of `variables` on the validation and test splits."""
  roles = [role for role in ('val', 'test') if run.images.splits[role] is not None]
  return reporting.split_metrics(run.evaluate, variables, roles)


def report_results(
    run: TrainingRun, state: state_lib.TrainState, position: Position, best: dict[str, Any] | None
) -> dict[str, Any]:
  """The end of a run: the validation and test splits evaluated with the final parameters
  and, when it is another step, with the best checkpoint (each labelled); results.json;
  a summary in the log.

  results.json: {'step', 'epoch', 'val_*' and 'test_*' (loss, accuracy, examples) of the
  final parameters, for the splits the run has}, and 'final' and 'best' records
  ({'checkpoint', 'step', 'dir' (relative to the run folder), the same metrics...})
  naming what each figure measured; with config.ema an 'ema' record of the moving
  average at the final step.
  """
  folder = run.folder
  step = int(state.step)
  final = {'checkpoint': 'final parameters', 'step': step, **_metrics(run, state.variables)}
  measured = {k: v for k, v in final.items() if k.startswith(('val_', 'test_'))}
  results: dict[str, Any] = {'step': step, 'epoch': position.epoch, **measured, 'final': final}
  if best is not None:
    # The folder relative to the run folder: results.json moves with it.
    record = {
        'checkpoint': 'best',
        'step': best['step'],
        'dir': str((folder.best / str(best['step'])).relative_to(folder.root)),
        'monitor': best['monitor'],
        'value': best['value'],
    }
    if best['step'] == step:
      record.update(measured)
    else:
      variables, _ = restore.read_variables(
          folder.best / str(best['step']),
          models.abstract_variables(run.model, run.dataset.info.image_shape),
      )
      # From the host: arrays on this process's device cannot be sent to other hosts'.
      record.update(_metrics(run, parallel.replicate(jax.device_get(variables), run.mesh)))
    results['best'] = record
  if state.ema is not None:
    results['ema'] = {
        'checkpoint': 'EMA of the final parameters',
        'step': step,
        **_metrics(run, state.ema_variables),
    }
  reporting.write_json(folder.results_json, results)
  if jax.process_index() == 0:
    logger.info(reporting.run_summary(folder, results))
  return results
