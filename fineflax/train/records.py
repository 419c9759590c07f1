"""What a phase leaves besides its checkpoints: the summary table and learning-rate groups
in the log when it starts, per-step records (`config.report.every_steps`), and each
epoch's record in metrics.jsonl, TensorBoard and history.png."""

from __future__ import annotations

import logging
from typing import Any

import jax

from fineflax.run import plots, step_records
from fineflax.train import ema as ema_lib, state as state_lib, summary
from fineflax.train.plan import PhasePlan
from fineflax.train.training_run import Position, TrainingRun

logger = logging.getLogger('fineflax.train')


def step_recorder(
    run: TrainingRun,
    plan: PhasePlan,
    state: state_lib.TrainState,
    position: Position,
    steps_per_epoch: int,
) -> step_records.StepRecorder | None:
  """The phase's per-step records (`config.report.every_steps`), if asked for."""
  every = run.config.report.every_steps
  if not every:
    return None
  first = int(state.step) - position.phase_epochs_done * steps_per_epoch - position.batch

  def write(record: dict[str, Any]) -> None:
    run.metrics_log.write(record)
    if run.tensorboard is not None:
      run.tensorboard.scalars(
          {k: record[k] for k in ('loss', 'accuracy', 'learning_rate', 'images_per_sec')},
          record['step'],
          'step/',
      )

  return step_records.StepRecorder(every, plan.name, plan.optimizer.learning_rate, first, write)


def log_summary(run: TrainingRun, plan: PhasePlan) -> None:
  """The phase's summary table (trainable / non-trainable counts) and its learning-rate
  groups, in the log."""
  spec = plan.config.freeze
  table = summary.format_summary(
      summary.summarize(run.model, run.dataset.info.image_shape, spec),
      f'{run.config.model.backbone} + head, phase {plan.name!r} (freeze {spec!r})',
  )
  logger.info('\n%s', table)
  if plan.groups_text:
    logger.info(
        '[%s] learning-rate groups (x learning_rate %g): %s',
        plan.name,
        plan.config.learning_rate,
        plan.groups_text,
    )


def report(run: TrainingRun, record: dict[str, Any]) -> None:
  """The epoch's record everywhere it goes: metrics.jsonl, TensorBoard, history.png."""
  run.metrics_log.write(record)
  if run.tensorboard is not None:
    for prefix, keys, suffix in (
        ('train/', ('loss', 'accuracy'), ''),
        ('val/', ('val_loss', 'val_accuracy'), ''),
        ('val_ema/', ('val_loss_ema', 'val_accuracy_ema'), ema_lib.SUFFIX),
    ):
      if keys[0] in record:
        run.tensorboard.scalars(
            {k.removeprefix('val_').removesuffix(suffix): record[k] for k in keys},
            record['step'],
            prefix,
        )
    # A fit phase (fineflax.train.fit_phase) has no learning rate.
    rates = {k: record[k] for k in ('learning_rate', 'images_per_sec') if record[k] is not None}
    run.tensorboard.scalars(
        rates,
        record['step'],
    )
    run.tensorboard.flush()
  if run.config.report.plot and jax.process_index() == 0:
    plots.write_history(run.folder.history_png, run.metrics_log.read())
