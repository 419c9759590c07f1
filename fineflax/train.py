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
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from fineflax import checkpoints, cli, config as config_lib, data, freeze, models, optimizers
from fineflax import parallel, reporting, state as state_lib, step as step_lib
from fineflax.evaluate import evaluate

logger = logging.getLogger('fineflax.train')  # not __name__: '__main__' under -m


def _compile_train_step(train_step, state, batch_size, image_shape, mesh):
  """Compiles ahead of the first batch, so epoch timings exclude compilation."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.AXIS))
  batch = {'image': jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), np.uint8,
                                         sharding=sharding),
           'label': jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharding),
           'weight': jax.ShapeDtypeStruct((batch_size,), np.float32, sharding=sharding)}
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  logger.info('compiled the train step in %.1f s', time.perf_counter() - start)
  return compiled


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                       devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Runs (or resumes) every phase of `config` in `workdir`; returns the test metrics.

  Args:
    config: the experiment; validated before anything else happens.
    workdir: the run directory; a checkpoint in it is resumed from.
    devices: devices to train on (default: every device of every process).
  """
  config = config_lib.validate(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  dataset = data.load_dataset(config.data)
  train_split = dataset.split(config.data.train_split)
  val_split = dataset.split(config.data.val_split)
  test_split = dataset.split(config.data.test_split) if config.data.test_split else None
  for name, split in [('train', train_split), ('val', val_split), ('test', test_split)]:
    if split is not None:
      logger.info('%s split: %d examples', name, len(split))
  model = models.from_config(config, dataset.info.class_names)
  mesh = parallel.make_mesh(devices)
  eval_batch_size = config.eval_batch_size or config.batch_size
  parallel.check_batch_size(config.batch_size, mesh)
  parallel.check_batch_size(eval_batch_size, mesh, 'config.eval_batch_size')

  ckpts = checkpoints.Checkpoints(workdir / 'checkpoints', config.checkpoint.keep)
  metrics_log = reporting.MetricsLog(workdir)
  resume = ckpts.latest_meta()
  if resume is None:
    metrics_log.truncate_after(-1)
  else:
    logger.info('resuming from step %d: phase %r, %d epoch(s) of it done', resume['step'],
                 resume['phase'], resume['phase_epochs_done'])
    metrics_log.truncate_after(resume['step'])

  variables = state_lib.init_variables(model, dataset.info.image_shape, config.seed)
  eval_step = step_lib.make_eval_step(model, mesh, label_smoothing=config.loss.label_smoothing)
  state = None
  run_epoch = resume['epoch'] if resume else 0
  for index, phase in enumerate(config.phases):
    if resume and index < resume['phase_index']:
      continue
    labels = freeze.freeze_labels(variables['params'], phase.freeze, model.backbone.layers)
    tx = freeze.partition_optimizer(optimizers.build_optimizer(phase), labels)
    start_step = int(state.step) if state is not None else 0
    state = parallel.replicate(state_lib.create_train_state(
        state.variables if state is not None else variables, tx, labels, start_step), mesh)
    phase_epochs_done = 0
    if resume and index == resume['phase_index']:
      state = ckpts.restore(resume['step'], state)
      phase_epochs_done = resume['phase_epochs_done']
    if phase_epochs_done >= phase.epochs:
      continue
    bn_train = (freeze.bn_train_layers(labels, model.layer_groups())
                if phase.batchnorm == 'train' else frozenset())
    train_step = _compile_train_step(
        step_lib.make_train_step(model, tx, labels, mesh, bn_train=bn_train, seed=config.seed,
                                 label_smoothing=config.loss.label_smoothing),
        state, config.batch_size, dataset.info.image_shape, mesh)
    for epoch in range(phase_epochs_done, phase.epochs):
      start = time.perf_counter()
      rng = np.random.default_rng([config.seed, index, epoch])
      sums = []
      for batch in data.train_batches(train_split, config.batch_size, rng):
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh))
        sums.append(metrics)
      train_metrics = step_lib.summarize(sums)
      seconds = time.perf_counter() - start
      val_metrics = evaluate(eval_step, state.variables, val_split, eval_batch_size, mesh)
      run_epoch += 1
      record = {'phase': phase.name, 'phase_index': index, 'phase_epoch': epoch + 1,
                'epoch': run_epoch, 'step': int(state.step),
                'loss': train_metrics['loss'], 'accuracy': train_metrics['accuracy'],
                'val_loss': val_metrics['loss'], 'val_accuracy': val_metrics['accuracy'],
                'learning_rate': phase.learning_rate,
                'images_per_sec': train_metrics['count'] / seconds}
      # The record first: one whose checkpoint never completed is dropped on resume,
      # while a checkpoint without its record would leave a hole in metrics.jsonl.
      metrics_log.write(record)
      logger.info(reporting.epoch_line(record, phase.epochs))
      ckpts.save(state, {'step': record['step'], 'phase_index': index, 'phase': phase.name,
                         'phase_epochs_done': epoch + 1, 'epoch': run_epoch})
  ckpts.wait()
  ckpts.close()

  results: dict[str, Any] = {'step': int(state.step), 'epoch': run_epoch}
  if test_split is not None:
    test = evaluate(eval_step, state.variables, test_split, eval_batch_size, mesh)
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
