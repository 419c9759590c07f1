"""Evaluates a checkpoint of a run on one split (`fineflax.inference.evaluate.evaluate_run`):
prints the report as a table (loss, accuracy, NLL, calibration error, balanced accuracy,
per class, confusion matrix) and writes it under DIR/eval/.

  python -m fineflax.evaluate --workdir DIR [--split train|val|test|NAME]
                              [--checkpoint best|latest|wise_ft|soup|STEP]
                              [--weights raw|ema] [--batch_size N]
                              [--tta none|flip|5crop|10crop] [--calibrate]
  fineflax-evaluate ...     the same program

  --split                   a role (train, val, test: default test) or a split name
  --checkpoint              best (default; else latest), latest, wise_ft (python -m
                            fineflax.interpolate's), soup (a soup's folder) or a step number
  --weights                 raw (default): the checkpoint's parameters; ema: their moving
                            average (a run with config.ema)
  --tta                     test-time augmentation, logits averaged over views: flip (the
                            image and its mirror), 5crop / 10crop (torchvision's FiveCrop /
                            TenCrop of the image resized to side / 0.875)
  --calibrate               fit a temperature on the validation split, save it in
                            DIR/calibration.json (predict and scripts/export.py use it) and
                            print ECE and NLL before and after it
  --coordinator HOST:PORT --num_processes N --process_id I
                            one process of a multi-host job (docs/multihost.md)
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags

from fineflax.cli import common
from fineflax.inference.evaluate import TOP_K, evaluate_run
from fineflax.inference.tta import MODES


def format_report(report: dict[str, Any], max_matrix_classes: int = 20) -> str:
  """`evaluate_run`'s report as a table: totals, calibration, per-class rows, the
  confusion matrix (up to `max_matrix_classes` classes; the PNG has it always)."""
  tta = '' if report.get('tta', 'none') == 'none' else f", tta {report['tta']}"
  lines = [
      f"{report['workdir']}: checkpoint {report['checkpoint']} (step {report['step']}), "
      f"split {report['split']!r} ({report['split_name']}), {report['examples']} examples" + tta,
      f"loss {report['loss']:.4f}  accuracy {report['accuracy']:.4f}"
      + (
          f"  top-{TOP_K} accuracy {report[f'top{TOP_K}_accuracy']:.4f}"
          if f'top{TOP_K}_accuracy' in report
          else ''
      ),
      f"balanced accuracy {report['balanced_accuracy']:.4f}  NLL {report['nll']:.4f}  "
      f"ECE {report['ece']:.4f} ({report['reliability']['bins']} bins)",
  ]
  calibrated = report.get('calibration')
  if calibrated:
    lines.append(
        f"temperature {calibrated['temperature']:.4f} (fitted on {calibrated['fitted_on']}, "
        f"{calibrated['fitted_examples']} examples): "
        f"ECE {calibrated['before']['ece']:.4f} -> {calibrated['after']['ece']:.4f}  "
        f"NLL {calibrated['before']['nll']:.4f} -> {calibrated['after']['nll']:.4f}"
    )
  lines.append('')
  width = max([len('class')] + [len(r['class']) for r in report['per_class']])
  lines.append(f"{'class':<{width}}  examples  correct    recall  precision")

  def shown(value: float | None) -> str:
    return '-' if value is None else f'{value:.4f}'

  for row in report['per_class']:
    lines.append(
        f"{row['class']:<{width}}  {row['examples']:>8}  {row['correct']:>7}  "
        f"{shown(row['recall']):>8}  {shown(row['precision']):>9}"
    )
  matrix = report['confusion_matrix']
  if len(matrix) <= max_matrix_classes:
    names = report['class_names']
    cell = max([len(str(v)) for r in matrix for v in r] + [len(n) for n in names])
    lines += [
        '',
        'confusion matrix (rows: true class, columns: predicted)',
        ' ' * width + ''.join(f'  {n:>{cell}}' for n in names),
    ]
    lines += [
        f'{name:<{width}}' + ''.join(f'  {v:>{cell}}' for v in r) for name, r in zip(names, matrix)
    ]
  files = report['files']
  written = [files['json'], files['confusion_png'], files['reliability_png']]
  written += [files[k] for k in ('calibration',) if k in files]
  lines += ['', f"wrote {', '.join(written)} and {files['predictions']}"]
  return '\n'.join(lines)


def evaluate(
    workdir: str,
    split: str,
    checkpoint: str,
    batch_size: int | None,
    weights: str = 'raw',
    tta: str = 'none',
    calibrate: bool = False,
) -> None:
  """Evaluates the run in `workdir` and prints the report."""
  report = evaluate_run(
      workdir, split, checkpoint, batch_size, weights=weights, tta=tta, calibrate=calibrate
  )
  if jax.process_index() == 0:
    print(format_report(report))


def main() -> None:
  """The program (also the `fineflax-evaluate` command)."""
  workdir = flags.DEFINE_string('workdir', None, 'Directory of a run (python -m fineflax.train).')
  split = flags.DEFINE_string('split', 'test', 'A role (train, val, test) or a split name.')
  checkpoint = flags.DEFINE_string(
      'checkpoint', 'best', "'best', 'latest', 'wise_ft', 'soup' or a step."
  )
  weights = common.define_weights_flag()
  batch_size = flags.DEFINE_integer(
      'batch_size', None, 'Global batch size; default: the ' "run's eval batch size."
  )
  tta = flags.DEFINE_string(
      'tta', 'none', f"Test-time augmentation: {', '.join(MODES)} (logits averaged over views)."
  )
  calibrate = flags.DEFINE_bool(
      'calibrate',
      False,
      'Fit a temperature on the validation split, save it with the run (predict and '
      'export apply it) and report ECE and NLL before and after it.',
  )
  flags.mark_flag_as_required('workdir')
  join = common.define_distributed_flags()  # every process of a job evaluates its share

  def absl_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    join()
    evaluate(
        workdir.value,
        split.value,
        checkpoint.value,
        batch_size.value,
        weights.value,
        tta.value,
        calibrate.value,
    )

  common.run_absl(absl_main, __doc__)


if __name__ == '__main__':
  main()
