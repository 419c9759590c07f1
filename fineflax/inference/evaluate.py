"""Evaluation over a whole split: every example counted exactly once.

`evaluate` gives a training run its loss and accuracy. `evaluate_run` opens a finished run
and reports more on one split: top-5 accuracy, NLL, expected calibration error, balanced
accuracy, per-class recall and precision, the confusion matrix; optionally with
test-time augmentation (`fineflax.inference.tta`) and a temperature fitted on the
validation split (`fineflax.inference.calibration`):

    python -m fineflax.evaluate --workdir runs/demo [--split test] [--checkpoint best]
                                [--tta flip] [--calibrate]

prints a table and writes `DIR/eval/<split>-<checkpoint>.json`, the confusion matrix as
`DIR/eval/<split>-<checkpoint>-confusion.png`, the reliability diagram as
`-reliability.png`, and each example's logits, probabilities and predicted class as
`-predictions.npz` (with TTA, `<checkpoint>-<tta>` in the names).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from fineflax import data
from fineflax.data import feed
from fineflax.data.augment import Augment
from fineflax.distributed import parallel
from fineflax.errors import ConfigError, DataError
from fineflax.inference import calibration, tta as tta_lib
from fineflax.run import RunDir, reporting, restore
from fineflax.train import step

logger = logging.getLogger('fineflax.evaluate')  # not __name__: '__main__' under -m
ROLES = ('train', 'val', 'test')
TOP_K = 5


def make_logits_step(
    model: Any, mesh: Mesh, *, augment: Augment = Augment(), tta: str = 'none'
) -> Callable[..., dict[str, jax.Array]]:
  """A jitted `(variables, batch) -> {'logits', 'label', 'weight'}` over the mesh.

  The images are prepared as `step.make_eval_step` prepares them (no augmentation; a
  random crop becomes the centre crop); `tta` (`tta.MODES`) averages the logits over views
  of each image cut from the batch on the device. The outputs stay sharded on the batch
  axis, row for row with the batch, labels and weights passed through so that the rows
  can be matched without knowing how the processes split the batch.
  """
  tta_lib.check_mode(tta)

  def logits_step(variables: dict[str, Any], batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    source, views = tta_lib.source_images(batch['image'], augment, tta, model.image_size)
    logits = tta_lib.averaged_logits(
        lambda images: model.apply(variables, images, train=False), source, views
    )
    return {'logits': logits, 'label': batch['label'], 'weight': batch['weight']}

  mapped = jax.shard_map(
      logits_step,
      mesh=mesh,
      in_specs=(P(), P(parallel.AXIS)),
      out_specs=P(parallel.AXIS),
      check_vma=False,
  )
  return jax.jit(mapped)


def _to_host(tree: Any) -> Any:
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def split_logits(
    logits_step: Callable[..., dict[str, jax.Array]],
    variables: dict[str, Any],
    split: data.Split,
    batch_size: int,
    mesh: Mesh,
) -> tuple[np.ndarray, np.ndarray]:
  """(logits (n, outputs), labels (n,)) of every example of `split` (of every process),
  each exactly once: the weight-0 padding rows are dropped."""
  # Host-gathered batches: one pass gains nothing from placing the split on the devices.
  batches = feed.device_batches(split, data.eval_batches(split, batch_size), mesh, None)
  # Transferred once at the end, so the host never stalls the devices between batches.
  outputs = _to_host([logits_step(variables, b) for b in batches])
  if not outputs:
    return np.zeros((0, 0), np.float32), np.zeros((0,), np.int32)
  rows = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  keep = rows['weight'] > 0
  return rows['logits'][keep], rows['label'][keep].astype(np.int32)


def probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities of logits: softmax, or for one logit (binary) [1 - p, p] with p
  the sigmoid."""
  if logits.shape[-1] == 1:  # binary: probability of class 1
    p = jax.nn.sigmoid(logits[:, 0])
    return jnp.stack([1 - p, p], axis=-1)
  return jax.nn.softmax(logits)


def predicted_classes(logits: np.ndarray) -> np.ndarray:
  """The class each row predicts: argmax, or for one logit (binary) class 1 above logit 0,
  as `step.per_example_loss` decides."""
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(np.int64)
  return np.argmax(logits, axis=-1)


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str], label_smoothing: float = 0.0
) -> dict[str, Any]:
  """Loss, accuracy, top-5 accuracy (more than 5 outputs), NLL, expected calibration
  error (`calibration.reliability`: 15 bins, its bins too), balanced accuracy (the mean
  recall of the classes with examples), per class its examples, correct predictions,
  recall (= its accuracy) and precision, and the confusion matrix (rows: true class,
  columns: predicted) of one split.

  Loss and accuracy are `step.per_example_loss`'s, as in training and `evaluate`; NLL is
  the loss without label smoothing, in float64.
  """
  n, count = len(class_names), len(labels)
  loss, correct = (
      np.asarray(x, np.float64)
      for x in step.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), label_smoothing)
  )
  predicted = predicted_classes(logits)
  # An output beyond the dataset's classes (e.g. Keras' 1000-class top) fits no column.
  inside = predicted < n
  confusion = np.zeros((n, n), np.int64)
  np.add.at(confusion, (labels[inside], predicted[inside]), 1)
  examples = np.bincount(labels, minlength=n)
  hits = np.bincount(labels, weights=correct, minlength=n)
  predictions = confusion.sum(axis=0)
  recall = [float(hits[i] / examples[i]) if examples[i] else None for i in range(n)]
  present = [r for r in recall if r is not None]
  reliability = calibration.reliability(logits, labels)
  report: dict[str, Any] = {
      'examples': count,
      'loss': float(loss.sum() / max(count, 1)),
      'accuracy': float(correct.sum() / max(count, 1)),
      'nll': calibration.nll(logits, labels),
      'ece': reliability['ece'],
      'balanced_accuracy': float(np.mean(present)) if present else float('nan'),
  }
  if logits.shape[-1] > TOP_K:
    true_logit = logits[np.arange(count), labels]
    rank = np.sum(logits > true_logit[:, None], axis=-1)
    report[f'top{TOP_K}_accuracy'] = float(np.mean(rank < TOP_K)) if count else float('nan')
  report['per_class'] = [
      {
          'class': name,
          'examples': int(examples[i]),
          'correct': int(round(hits[i])),
          'accuracy': recall[i],
          'recall': recall[i],
          'precision': float(confusion[i, i] / predictions[i]) if predictions[i] else None,
      }
      for i, name in enumerate(class_names)
  ]
  report['confusion_matrix'] = confusion.tolist()
  report['reliability'] = {k: v for k, v in reliability.items() if k != 'ece'}
  if not inside.all():
    report['predicted_outside_classes'] = int(np.sum(~inside))
  return report


def resolve_split(
    split: str,
    data_config: ml_collections.ConfigDict,
    available: Sequence[str],
    absent: Sequence[str] = (),
) -> str:
  """The dataset split name of `split`: a role (train/val/test, through
  `config.data.<role>_split`) or a split name of the dataset (`available`: those loaded;
  `absent`: those the config names that the source did not find, `data.Dataset.absent`).
  """
  name = split
  if split in ROLES:
    name = data_config[f'{split}_split']
    if name is None or name in absent:
      why = (
          f'config.data.{split}_split is None'
          if name is None
          else f'config.data.{split}_split={name!r}: config.data.source={data_config.source!r} '
          'has no such split'
      )
      raise ConfigError(
          f'--split={split}: the run has no {split} split ({why}); its splits: '
          + _run_splits(data_config, available, absent)
      )
  if name not in available:
    raise ConfigError(
        f'--split={split}: the dataset has the splits {sorted(available)} '
        f'(or a role: {", ".join(ROLES)})'
    )
  return name


def _run_splits(
    data_config: ml_collections.ConfigDict, available: Sequence[str], absent: Sequence[str]
) -> str:
  """The splits there are, each role with its split name ("train ('train'), val
  ('validation')"): those the config names and the source found, loaded or not."""
  named = {
      data_config[f'{role}_split']: role
      for role in ROLES
      if data_config[f'{role}_split'] is not None
  }
  found = [name for name in named if name not in absent]
  found += sorted(name for name in available if name not in named)
  shown = [f'{named[name]} ({name!r})' if name in named else repr(name) for name in found]
  return ', '.join(shown) or 'none'


def eval_batch_size(requested: int | None, config: ml_collections.ConfigDict, devices: int) -> int:
  """`requested`, checked; else the run's eval batch size rounded up to a multiple of the
  devices at hand (which need not be those the run trained on)."""
  if requested is not None:
    if requested <= 0 or requested % devices:
      raise ConfigError(
          f'--batch_size={requested}: must be a positive multiple of the ' f'{devices} devices'
      )
    return requested
  size = config.eval_batch_size or config.batch_size
  return -(-size // devices) * devices


def evaluate_run(
    workdir: str | os.PathLike,
    split: str = 'test',
    checkpoint: str | int = 'best',
    batch_size: int | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrate: bool = False,
) -> dict[str, Any]:
  """Evaluates a checkpoint of the run in `workdir` on one split and writes the report.

  Args:
    workdir: a directory `python -m fineflax.train` wrote.
    split: a role ('train', 'val', 'test') or a split name of the run's dataset.
    checkpoint: 'best' (else latest), 'latest' or a step number.
    batch_size: global batch size (default: the run's eval batch size).
    devices: devices to evaluate on (default: every device of every process).
    weights: 'raw', or 'ema' for the checkpoint's moving average (config.ema).
    tta: test-time augmentation, one of `tta.MODES`: logits averaged over views.
    calibrate: fit a temperature on the validation split's logits (with the same `tta`),
      save it in DIR/calibration.json under the checkpoint's label, and report the
      split's ECE and NLL before and after it.
  Returns:
    `classification_metrics` plus where it comes from (workdir, split, split_name,
    checkpoint, step, checkpoint_dir, class_names, tta), with `calibrate` the
    calibration (temperature, what it was fitted on, before and after), and the files
    written (files).
  Raises:
    ConfigError: no such run, checkpoint or split, a dataset whose classes changed, an
      unknown `tta`, `calibrate` for a run without a validation split.
    DataError: the split (or, with `calibrate`, the validation split) has no example.
  """
  tta_lib.check_mode(tta)
  workdir = RunDir(workdir).root
  run = restore.load_run(workdir, checkpoint, weights)
  if calibrate and run.config.data.val_split is None:
    raise ConfigError(_NO_VAL + '(config.data.val_split is None)')
  # Only the split asked for (and for --calibrate the validation split) is decoded when
  # it is one the config names.
  keys = [
      k for k in data.SPLIT_KEYS if split == k.removesuffix('_split') or split == run.config.data[k]
  ][:1] or list(data.SPLIT_KEYS)
  if calibrate and 'val_split' not in keys:
    keys.append('val_split')
  dataset = data.load_dataset(run.config.data, keys)
  if tuple(dataset.info.class_names) != tuple(run.class_names):
    raise ConfigError(
        f'{workdir}: the run was trained on the classes {list(run.class_names)} '
        f'but its dataset now has {list(dataset.info.class_names)}'
    )
  name = resolve_split(split, run.config.data, list(dataset.splits), dataset.absent)
  val_name = run.config.data.val_split
  if calibrate and (val_name in dataset.absent or val_name not in dataset.splits):
    raise ConfigError(
        _NO_VAL + f'(config.data.val_split={val_name!r}: config.data.source='
        f'{run.config.data.source!r} has no such split)'
    )
  for needed in [name] + [val_name] * calibrate:
    if dataset.splits[needed].size == 0:
      raise DataError(
          f'{workdir}: split {needed!r} of config.data.source='
          f'{run.config.data.source!r} has no example to evaluate'
      )
  mesh = parallel.make_mesh(devices)
  size = eval_batch_size(batch_size, run.config, mesh.devices.size)
  logits_step = make_logits_step(
      run.model, mesh, augment=data.augment_from_config(run.config.data), tta=tta
  )
  # Placed from host copies: the restored arrays sit on this process's first device, and
  # JAX does not move such an array onto the devices of other processes.
  variables = parallel.replicate(jax.device_get(run.variables), mesh)
  logits, labels = split_logits(logits_step, variables, dataset.splits[name], size, mesh)
  report = {
      'workdir': str(workdir),
      'split': split,
      'split_name': name,
      'checkpoint': run.label,
      'step': run.step,
      'checkpoint_dir': str(run.checkpoint_dir),
      'class_names': list(run.class_names),
      'tta': tta,
  }
  report.update(
      classification_metrics(logits, labels, run.class_names, run.config.loss.label_smoothing)
  )
  stem = RunDir(workdir).eval_stem(split, run.label if tta == 'none' else f'{run.label}-{tta}')
  report['files'] = {
      'json': str(stem) + '.json',
      'confusion_png': str(stem) + '-confusion.png',
      'reliability_png': str(stem) + '-reliability.png',
      'predictions': str(stem) + '-predictions.npz',
  }
  if calibrate:
    val = (logits, labels) if val_name == name else None
    if val is None:
      val = split_logits(logits_step, variables, dataset.splits[val_name], size, mesh)
    report['calibration'] = calibration.calibrate(workdir, run, val, val_name, tta, logits, labels)
    report['files']['calibration'] = str(RunDir(workdir).calibration_json)
  if jax.process_index() == 0:
    _write_files(report, logits, labels, run)
  reporting.write_json(report['files']['json'], report)
  return report


_NO_VAL = '--calibrate: the run has no validation split to fit the temperature on '


def _write_files(
    report: dict[str, Any], logits: np.ndarray, labels: np.ndarray, run: restore.RestoredRun
) -> None:
  """The predictions .npz and the confusion and reliability PNGs of `report` (process 0)."""
  files = report['files']
  epath.Path(files['json']).parent.mkdir(parents=True, exist_ok=True)
  arrays = {
      'logits': logits,
      'labels': labels,
      'probabilities': np.asarray(probabilities(jnp.asarray(logits))),
      'predicted': predicted_classes(logits),
  }
  calibrated = report.get('calibration')
  if calibrated:
    scaled = jnp.asarray(logits / np.float32(calibrated['temperature']))
    arrays['calibrated_probabilities'] = np.asarray(probabilities(scaled))
  # Rows in the order the batches came (on one process: the split's order).
  with epath.Path(files['predictions']).open('wb') as f:  # local or gs://
    np.savez(f, **arrays)
  from fineflax.run import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow)

  where = f"{report['split']} split, checkpoint {run.label} (step {run.step})"
  if report['tta'] != 'none':
    where += f", tta {report['tta']}"
  plots.write_confusion(
      files['confusion_png'],
      np.asarray(report['confusion_matrix']),
      list(run.class_names),
      title=f"{where}: accuracy {report['accuracy']:.4f}",
  )
  panels = [('uncalibrated', report['ece'], report['reliability'])]
  if calibrated:
    panels.append(
        (
            f"temperature {calibrated['temperature']:.3f}",
            calibrated['after']['ece'],
            calibrated['reliability_after'],
        )
    )
  plots.write_reliability(files['reliability_png'], panels, title=where)
