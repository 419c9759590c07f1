"""Running one phase of a run: its epochs, evaluation, records, checkpoints, early stopping.

`fineflax.train.training` sets a run up (`TrainingRun`) and calls `start_state` and
`train_phase` for each phase. A phase trains on the images, or, when it trains only the
head on images that are not augmented, on features cached once at its start
(`fineflax.train.inputs`).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from typing import Any, Iterable

import jax
import numpy as np

from fineflax import data
from fineflax.data import feed
from fineflax.distributed import parallel
from fineflax.distributed.preemption import Preempted
from fineflax.errors import TrainingDivergedError
from fineflax.run import checkpoints, progress, reporting, step_records
from fineflax.train import ema as ema_lib, inputs, records, state as state_lib, step as step_lib
from fineflax.train.early_stopping import EarlyStopping
from fineflax.train.plan import PhasePlan
from fineflax.train.training_run import Inputs, Position, TrainingRun

logger = logging.getLogger('fineflax.train')
IN_FLIGHT = 4  # train steps dispatched ahead of the last one finished


def _epoch_inputs(
    run: TrainingRun,
    on: Inputs,
    rng: np.random.Generator,
    position: Position,
    row0_step: int,
    first_only: bool = False,
) -> tuple[Iterable[dict[str, Any]], dict[str, Any]]:
  """The per-step batches of the epoch from `position.batch` on (`first_only`: the first
  one), and the `data` of its steps. A split on the devices gets the epoch's plan there at
  once (`data`), and its steps get no batch at all; other splits' batches are gathered or
  read, and transferred, while earlier steps run."""
  cfg = run.config
  split, resident = on.splits['train'], on.resident['train']
  start = parallel.replicate(np.asarray(row0_step, np.int32), run.mesh)
  if resident is not None:
    plan = data.epoch_plan(split, cfg.batch_size, rng)
    placed = parallel.shard_plan(plan, run.mesh)
    inputs = {
        **resident,
        'plan_index': placed['index'],
        'plan_weight': placed['weight'],
        'start': start,
    }
    return itertools.repeat({}, len(plan['index']) - position.batch), inputs
  batches = itertools.islice(
      data.train_batches(split, cfg.batch_size, rng),
      position.batch,
      position.batch + 1 if first_only else None,
  )
  return feed.device_batches(split, batches, run.mesh, None), {'start': start}


def train_epoch(
    run: TrainingRun,
    on: Inputs,
    train_step: step_lib.CompiledTrainStep,
    state: state_lib.TrainState,
    rng: np.random.Generator,
    position: Position,
    phase_name: str,
    epochs_in_phase: int,
    steps: step_records.StepRecorder | None = None,
) -> tuple[state_lib.TrainState, dict[str, float], bool]:
  """One pass over the train split in the order `rng` draws, from `position.batch` on.

  The loop does little per step (the host's time per step is what a fast accelerator
  waits for): the step's inputs and its row of metrics stay on the device, only the
  state's carry crosses each call, and the host waits only for the step IN_FLIGHT steps
  back. The progress display and the per-step records (`steps`) read versions of the
  epoch's metrics that are already computed. Saves every `checkpoint.every_steps` steps;
  after a SIGTERM it saves and raises Preempted. Returns the state, the epoch's metrics
  (with `seconds`) and whether a SIGTERM asks to stop once the epoch's end is saved.
  """
  cfg = run.config
  start = time.perf_counter()
  total = data.num_batches(on.splits['train'], cfg.batch_size)
  shown = progress.Progress(
      total,
      cfg.report.progress if jax.process_index() == 0 else 'off',
      f'[{phase_name}] epoch {position.phase_epochs_done + 1}/{epochs_in_phase}',
      batches_done=position.batch,
      start_sums=position.sums,
  )
  # The step counted on the host: reading state.step would wait for every step.
  first = step = int(state.step)
  row0_step = first - position.batch  # row r of the metrics is step row0_step + r + 1
  batches, inputs = _epoch_inputs(run, on, rng, position, row0_step)
  metrics = parallel.replicate(np.zeros((total, len(progress.METRICS)), np.float32), run.mesh)
  start_sums = dict(position.sums)
  if steps is not None:
    steps.begin_epoch(row0_step, step)
  carry, fixed = train_step.split(state)
  in_flight: collections.deque[jax.Array] = collections.deque()
  every = cfg.checkpoint.every_steps
  stop_at_end = False
  for batch in batches:
    carry, metrics = train_step.run(carry, fixed, batch, inputs, metrics)
    step += 1
    position.batch += 1
    in_flight.append(metrics)
    if len(in_flight) > IN_FLIGHT:
      # Dispatch runs ahead of the devices without bound (on a CPU: dozens of steps, each
      # holding its inputs); a few queued steps keep the devices busy.
      done = in_flight.popleft()
      done.block_until_ready()
      shown.update(done, position.batch - IN_FLIGHT)
      if steps is not None:
        steps.update(done, position.batch - IN_FLIGHT)
    if steps is not None:
      steps.dispatched(step)
    # An epoch's last step is saved after its evaluation, with the epoch counted as done.
    stop, at_end = run.stop.at(step), position.batch == total
    if stop and at_end:
      # Saved at the epoch's end, after its evaluation, as every epoch: a step saved
      # here as well would be saved twice once resumed.
      stop_at_end = True
    elif stop or (every and step % every == 0 and not at_end):
      rows = np.asarray(jax.device_get(metrics))
      state = train_step.join(carry, fixed)
      position.sums = progress.sum_rows(rows[first - row0_step : position.batch], start_sums)
      _check_finite(run, state, position.sums, rows, row0_step, first, phase_name)
      run.checkpoints.save(state, position.meta(step, phase_name))
      if stop:
        shown.close(rows, position.batch)
        if steps is not None:
          steps.close(rows, position.batch)  # the resumed run does not redo these steps
        raise Preempted(
            f'SIGTERM: saved step {step} (phase {phase_name!r}, '
            f'{position.batch} batches into an epoch); the same command resumes'
        )
  rows = np.asarray(jax.device_get(metrics))
  shown.close(rows, position.batch)
  state = train_step.join(carry, fixed)
  totals = progress.sum_rows(rows[first - row0_step :], start_sums)
  _check_finite(run, state, totals, rows, row0_step, first, phase_name)
  if steps is not None:
    steps.end_epoch(rows)
  count = max(totals['count'], 1.0)
  metrics_out = {
      'loss': totals['loss'] / count,
      'accuracy': totals['correct'] / count,
      'count': int(round(totals['count'])),
      'seconds': time.perf_counter() - start,
  }
  position.batch, position.sums = 0, {}
  return state, metrics_out, stop_at_end


def _check_finite(
    run: TrainingRun,
    state: state_lib.TrainState,
    totals: dict[str, float],
    rows: np.ndarray,
    row0_step: int,
    first: int,
    phase_name: str,
) -> None:
  """Raises TrainingDivergedError, naming the first bad step, when the loss summed over
  the epoch so far, or any parameter, is not finite. Checked where the metrics reach the
  host anyway (before a save, at the epoch's end), so a diverged state is never saved or
  evaluated and no step waits. `rows`: the epoch's metrics, row r of step row0_step + r +
  1; this session's steps are those after `first`, up to `state`'s."""
  finite_loss = np.isfinite(totals['loss'])
  if finite_loss and state_lib.is_finite(state):
    return
  step = int(state.step)
  if finite_loss:
    what = f'the parameters hold NaN or inf after step {step}'
  else:
    losses = rows[first - row0_step : step - row0_step, 0]
    bad = int(np.argmax(~np.isfinite(losses)))
    what = f'the training loss is {losses[bad]} at step {first + bad + 1}'
  good = run.checkpoints.latest.latest_meta()
  kept = (
      f"the last checkpoint, step {good['step']}, is kept in " f'{run.folder.latest}'
      if good
      else 'no checkpoint was saved yet'
  )
  raise TrainingDivergedError(
      f'[{phase_name}] {what}; the run stopped without saving that state ({kept}). Lower '
      'the learning rate, clip gradients (phases[i].clip_norm) or check the data, then run '
      'the same command again.'
  )


def start_state(
    run: TrainingRun,
    plan: PhasePlan,
    previous: state_lib.TrainState | None,
    variables: dict[str, Any],
    resume: dict[str, Any] | None,
) -> state_lib.TrainState:
  """The phase's starting state: a new optimizer over the parameters so far (what Keras'
  re-`compile` does), or, for the phase a run resumes in, its checkpoint."""
  start = variables if previous is None else previous.variables
  step = 0 if previous is None else int(previous.step)
  state = parallel.replicate(state_lib.create_train_state(start, plan.optimizer, step), run.mesh)
  if run.ema is not None:
    state = state.replace(
        ema=ema_lib.begin(
            run.ema,
            plan.optimizer.trainable(state.params),
            ema_lib.trained_stats(state.batch_stats, plan.bn_train) if plan.bn_train else None,
            state.step,
            None if previous is None else previous.ema,
        )
    )
  if resume and plan.index == resume['phase_index']:
    state = run.checkpoints.latest.restore(resume['step'], state)
    if run.checkpoints.catch_up_best(resume, run.metrics_log.read()):
      logger.info(
          'best %s so far: %.4f (checkpoints/best, caught up on resume)',
          run.checkpoints.monitor,
          run.checkpoints.best_value,
      )
  return state


def _compile_train_step(
    run: TrainingRun, plan: PhasePlan, state: state_lib.TrainState, on: Inputs
) -> step_lib.CompiledTrainStep:
  """The phase's train step, compiled ahead of the first batch for the inputs its epochs
  pass (epoch timings exclude compilation)."""
  cfg = run.config
  train_step = step_lib.make_train_step(
      run.model,
      plan.optimizer,
      run.mesh,
      bn_train=plan.bn_train,
      seed=cfg.seed,
      label_smoothing=cfg.loss.label_smoothing,
      augment=data.Augment() if on.on_features else plan.augment,
      class_weights=run.class_weights,
      on_features=on.on_features,
      ema=run.ema,
  )
  batches, inputs = _epoch_inputs(run, on, np.random.default_rng(0), Position(), 0, first_only=True)
  total = data.num_batches(on.splits['train'], cfg.batch_size)
  metrics = parallel.replicate(np.zeros((total, len(progress.METRICS)), np.float32), run.mesh)
  start = time.perf_counter()
  compiled = train_step.compile(state, next(iter(batches)), inputs, metrics)
  logger.info('compiled the train step in %.1f s', time.perf_counter() - start)
  return compiled


def train_phase(
    run: TrainingRun, plan: PhasePlan, state: state_lib.TrainState, position: Position
) -> state_lib.TrainState:
  """The phase's remaining epochs, with evaluation, records, checkpoints, early stopping.

  With `early_stopping.restore_best` the phase ends on its best epoch's parameters (kept
  in checkpoints/phase_best/, so a run resumed at the phase's end restores them too).
  """
  cfg, phase, index = run.config, plan.config, plan.index
  watcher = EarlyStopping.from_config(phase.early_stopping, position.early_stopping)
  phase_best = None
  if phase.early_stopping.restore_best:
    folder = run.folder.phase_best
    # Saves of epochs this run will redo (or of an earlier phase) would shadow new ones.
    after = -1 if position.phase_epochs_done == 0 and position.batch == 0 else int(state.step)
    checkpoints.remove_steps_after(folder, after)
    phase_best = checkpoints.Checkpoints(folder, 1)
  train_step = steps = None
  while position.phase_epochs_done < phase.epochs and not watcher.should_stop:
    if train_step is None:  # not before: a phase resumed at its end trains nothing
      records.log_summary(run, plan)
      on = inputs.phase_inputs(run, plan, state)
      steps_per_epoch = data.num_batches(on.splits['train'], cfg.batch_size)
      train_step = _compile_train_step(run, plan, state, on)
      steps = records.step_recorder(run, plan, state, position, steps_per_epoch)
    epoch = position.phase_epochs_done
    # The data order is a function of (seed, phase, epoch): a resumed run sees the same.
    rng = np.random.default_rng([cfg.seed, index, epoch])
    state, train, stop = train_epoch(
        run, on, train_step, state, rng, position, phase.name, phase.epochs, steps
    )
    val = run.evaluate(state.variables, 'val', on) if on.splits['val'] is not None else {}
    val_ema = (
        run.evaluate(state.ema_variables, 'val', on)
        if on.splits['val'] is not None and state.ema is not None
        else {}
    )
    run.record_unreadable()
    position.epoch += 1
    position.phase_epochs_done += 1
    record = {
        'phase': phase.name,
        'phase_index': index,
        'phase_epoch': epoch + 1,
        'epoch': position.epoch,
        'step': int(state.step),
        'loss': train['loss'],
        'accuracy': train['accuracy'],
        'val_loss': val.get('loss'),
        'val_accuracy': val.get('accuracy'),
        **(
            {'val_loss_ema': val_ema['loss'], 'val_accuracy_ema': val_ema['accuracy']}
            if val_ema
            else {}
        ),
        # The rate of the epoch's last update, as Keras' history reports it.
        'learning_rate': plan.optimizer.learning_rate((epoch + 1) * steps_per_epoch - 1),
        'images_per_sec': train['count'] / train['seconds'],
    }
    if phase.early_stopping.patience or phase_best:
      if watcher.update(record, epoch + 1) and phase_best:
        phase_best.save(state, {'step': record['step'], 'phase_index': index})
        phase_best.wait()  # before latest/ records this epoch as the phase's best
      position.early_stopping = watcher.state()
    # The record first: one whose checkpoint never completed is dropped on resume,
    # while a checkpoint without its record would leave a hole in metrics.jsonl.
    records.report(run, record)
    logger.info(reporting.epoch_line(record, phase.epochs))
    if run.checkpoints.save(state, position.meta(record['step'], phase.name), record):
      logger.info(
          'best %s so far: %.4f (checkpoints/best)',
          run.checkpoints.monitor,
          record[run.checkpoints.monitor],
      )
    if stop:
      raise Preempted(
          f'SIGTERM: saved step {record["step"]} (phase {phase.name!r}, the end '
          f'of epoch {epoch + 1}); the same command resumes'
      )
  if steps is not None:
    steps.close()
  if watcher.should_stop:
    logger.info(
        '[%s] early stopping: no %s improvement in %d epochs',
        phase.name,
        watcher.monitor,
        watcher.patience,
    )
  if phase_best:
    best = phase_best.latest_meta()
    if best and best['phase_index'] == index:
      # Its parameters only, as Keras' restore_best_weights: the step and the optimizer
      # go on, so later saves still come after the ones already made.
      saved = phase_best.restore(best['step'], state)
      state = state.replace(params=saved.params, batch_stats=saved.batch_stats)
      logger.info(
          '[%s] restored the parameters of its best epoch (%d, %s %.4f)',
          phase.name,
          watcher.best_epoch,
          watcher.monitor,
          watcher.best,
      )
    phase_best.close()
  return state


def end_phase(run: TrainingRun, plan: PhasePlan, state: state_lib.TrainState) -> None:
  """Keeps the weights a phase ends with, but the last phase's, in checkpoints/phase_end/:
  where the next phase starts, one end of a WiSE-FT interpolation (fineflax.interpolate)."""
  if plan.index < len(run.plans) - 1:
    meta = {'step': int(state.step), 'phase': plan.name, 'phase_index': plan.index}
    checkpoints.save_variables(run.folder.phase_end, state.variables, meta, len(run.plans))
