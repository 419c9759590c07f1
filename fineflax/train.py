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

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from fineflax import checkpoints, cli, config as config_lib, data, freeze, models, optimizers
from fineflax import parallel, reporting, state as state_lib, step as step_lib, weights
from fineflax.data import feed, preview
from fineflax.errors import ConfigError
from fineflax.evaluate import evaluate

logger = logging.getLogger('fineflax.train')  # not __name__: '__main__' under -m


def _compile_train_step(train_step, state, batch, resident):
  """Compiles ahead of the first batch, so epoch timings exclude compilation."""
  start = time.perf_counter()
  compiled = train_step.lower(state, batch, resident or {}).compile()
  logger.info('compiled the train step in %.1f s', time.perf_counter() - start)
  return compiled


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


def train_epoch(train_step: Callable[..., Any], state: state_lib.TrainState,
                split: data.Split, batch_size: int, rng: np.random.Generator,
                mesh: jax.sharding.Mesh, resident: dict[str, jax.Array] | None = None
                ) -> tuple[state_lib.TrainState, dict[str, float]]:
  """One pass over `split` in the order `rng` draws; returns the state and the metrics
  (with `seconds`). Metrics stay on the device until the epoch ends: no per-step sync."""
  start = time.perf_counter()
  sums = []
  batches = feed.device_batches(split, data.train_batches(split, batch_size, rng), mesh,
                                resident)
  for batch in batches:
    state, metrics = train_step(state, batch, resident or {})
    sums.append(metrics)
  metrics = step_lib.summarize(sums)
  metrics['seconds'] = time.perf_counter() - start
  return state, metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Runs (or resumes) every phase of `config` in `workdir`; returns the test metrics.

  Args:
    config: the experiment; validated, with every phase's freeze spec, before anything
      is written.
    workdir: the run directory; a checkpoint in it is resumed from.
    devices: devices to train on (default: every device of every process).
  """
  config = config_lib.validate(config)
  dataset = data.load_dataset(config.data)
  splits = dataset_splits(dataset, config.data)
  model = models.from_config(config, dataset.info.class_names)
  mesh = parallel.make_mesh(devices)
  eval_batch_size = config.eval_batch_size or config.batch_size
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(eval_batch_size, mesh, 'config.eval_batch_size')
  plans = freeze_plans(model, dataset.info.image_shape, config.phases)
  workdir = Path(workdir)
  # The weight file is found (or downloaded) before the run writes anything; a run that
  # will resume restores its own parameters and needs no file.
  weights_path = None
  if config.model.weights and not checkpoints.has_checkpoint(workdir / 'checkpoints'):
    weights_path = weights.resolve(config.model.weights, config.model.backbone,
                                   config.model.include_top)

  workdir.mkdir(parents=True, exist_ok=True)
  ckpts = checkpoints.Checkpoints(workdir / 'checkpoints', config.checkpoint.keep)
  metrics_log = reporting.MetricsLog(workdir)
  resume = ckpts.latest_meta()
  if resume is not None and resume['phase_index'] >= len(config.phases):
    raise ConfigError(f'{workdir} holds a run at phase {resume["phase_index"]} '
                      f'({resume["phase"]!r}) but the config has {len(config.phases)} phases')
  if resume is not None:
    logger.info('resuming from step %d: phase %r, %d epoch(s) of it done', resume['step'],
                resume['phase'], resume['phase_epochs_done'])
  # Records after the checkpoint resumed from belong to epochs that will be redone.
  metrics_log.truncate_after(resume['step'] if resume else -1)

  augment = data.augment_from_config(config.data)
  resident = feed.place_splits(splits, mesh, config.data.device_resident,
                               config.data.device_resident_max_mb)
  samples = workdir / 'samples.png'
  if jax.process_index() == 0 and not samples.exists():
    preview.write_samples(samples, splits['train'], dataset.info.class_names, augment,
                          model.image_size, config.seed)
  variables = state_lib.init_variables(model, dataset.info.image_shape, config.seed)
  if config.model.weights and resume is None:
    variables, report = weights.load_pretrained(config.model, model, variables, weights_path)
    logger.info(report.text())
  eval_step = step_lib.make_eval_step(model, mesh, label_smoothing=config.loss.label_smoothing,
                                      augment=augment)
  state = None
  run_epoch = resume['epoch'] if resume else 0
  for index, (phase, labels) in enumerate(zip(config.phases, plans)):
    if resume and index < resume['phase_index']:
      continue
    # A new phase keeps parameters and statistics and starts a new optimizer.
    tx = freeze.partition_optimizer(optimizers.build_optimizer(phase), labels)
    state = parallel.replicate(state_lib.create_train_state(
        variables if state is None else state.variables, tx, labels,
        0 if state is None else int(state.step)), mesh)
    phase_epochs_done = 0
    if resume and index == resume['phase_index']:
      state = ckpts.restore(resume['step'], state)
      phase_epochs_done = resume['phase_epochs_done']
    if phase_epochs_done >= phase.epochs:
      continue
    bn_train = (freeze.bn_train_layers(labels, model.layer_groups())
                if phase.batchnorm == 'train' else frozenset())
    first = next(feed.device_batches(splits['train'], data.train_batches(
        splits['train'], config.batch_size, np.random.default_rng(0)), mesh, resident['train']))
    train_step = _compile_train_step(
        step_lib.make_train_step(model, tx, labels, mesh, bn_train=bn_train, seed=config.seed,
                                 label_smoothing=config.loss.label_smoothing, augment=augment),
        state, first, resident['train'])
    for epoch in range(phase_epochs_done, phase.epochs):
      # The data order is a function of (seed, phase, epoch): a resumed run sees the same.
      rng = np.random.default_rng([config.seed, index, epoch])
      state, train = train_epoch(train_step, state, splits['train'], config.batch_size, rng,
                                 mesh, resident['train'])
      val = {'loss': None, 'accuracy': None}
      if splits['val'] is not None:
        val = evaluate(eval_step, state.variables, splits['val'], eval_batch_size, mesh,
                       resident['val'])
      run_epoch += 1
      record = {'phase': phase.name, 'phase_index': index, 'phase_epoch': epoch + 1,
                'epoch': run_epoch, 'step': int(state.step),
                'loss': train['loss'], 'accuracy': train['accuracy'],
                'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
                'learning_rate': phase.learning_rate,
                'images_per_sec': train['count'] / train['seconds']}
      # The record first: one whose checkpoint never completed is dropped on resume,
      # while a checkpoint without its record would leave a hole in metrics.jsonl.
      metrics_log.write(record)
      logger.info(reporting.epoch_line(record, phase.epochs))
      ckpts.save(state, {'step': record['step'], 'phase_index': index, 'phase': phase.name,
                         'phase_epochs_done': epoch + 1, 'epoch': run_epoch})
  ckpts.close()

  results: dict[str, Any] = {'step': int(state.step), 'epoch': run_epoch}
  if splits['test'] is not None:
    test = evaluate(eval_step, state.variables, splits['test'], eval_batch_size, mesh,
                    resident['test'])
    results.update(test_loss=test['loss'], test_accuracy=test['accuracy'],
                   test_examples=test['count'])
  reporting.write_json(workdir / 'results.json', results)
  return results


def main(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains `config` in `workdir` and prints the test accuracy."""
  # Compiled steps are cached on disk: a resumed or repeated run skips most compilation.
  cache = Path(os.environ.get('FINEFLAX_CACHE', Path.home() / '.cache' / 'fineflax'))
  jax.config.update('jax_compilation_cache_dir', str(cache / 'xla'))
  results = train_and_evaluate(config, workdir)
  if 'test_accuracy' in results:
    print(f"test_accuracy: {results['test_accuracy']:.4f} "
          f"({results['test_examples']} examples, test_loss {results['test_loss']:.4f})")


if __name__ == '__main__':
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Directory of the run (checkpoints, metrics).')
  cli.run(lambda config: main(config, _WORKDIR.value), required=('config', 'workdir'))
