"""Evaluates a checkpoint of a run on one split (`fineflax.inference.evaluate.evaluate_run`):
prints the report as a table (loss, accuracy, per class, confusion matrix) and writes it
under DIR/eval/.

  python -m fineflax.evaluate --workdir DIR [--split train|val|test|NAME]
                              [--checkpoint best|latest|wise_ft|soup|STEP]
                              [--weights raw|ema] [--batch_size N]
  fineflax-evaluate ...     the same program

  --split                   a role (train, val, test: default test) or a split name
  --checkpoint              best (default; else latest), latest, wise_ft (python -m
                            fineflax.interpolate's), soup (a soup's folder) or a step number
  --weights                 raw (default): the checkpoint's parameters; ema: their moving
                            average (a run with config.ema)
  --coordinator HOST:PORT --num_processes N --process_id I
                            one process of a multi-host job (docs/multihost.md)
"""

from __future__ import annotations

from typing import Any

import jax
from absl import app, flags

from fineflax.cli import common
from fineflax.inference.evaluate import TOP_K, evaluate_run


def format_report(report: dict[str, Any], max_matrix_classes: int = 20) -> str:
  """`evaluate_run`'s report as a table: totals, per-class rows, the confusion matrix
  (up to `max_matrix_classes` classes; the PNG has it always)."""
  lines = [
      f"{report['workdir']}: checkpoint {report['checkpoint']} (step {report['step']}), "
      f"split {report['split']!r} ({report['split_name']}), {report['examples']} examples",
      f"loss {report['loss']:.4f}  accuracy {report['accuracy']:.4f}"
      + (
          f"  top-{TOP_K} accuracy {report[f'top{TOP_K}_accuracy']:.4f}"
          if f'top{TOP_K}_accuracy' in report
          else ''
      ),
      '',
  ]
  width = max([len('class')] + [len(r['class']) for r in report['per_class']])
  lines.append(f"{'class':<{width}}  examples  correct  accuracy")
  for row in report['per_class']:
    accuracy = '-' if row['accuracy'] is None else f"{row['accuracy']:.4f}"
    lines.append(
        f"{row['class']:<{width}}  {row['examples']:>8}  {row['correct']:>7}  " f'{accuracy:>8}'
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
  lines += ['', f"wrote {files['json']}, {files['confusion_png']} and {files['predictions']}"]
  return '\n'.join(lines)


def evaluate(
    workdir: str, split: str, checkpoint: str, batch_size: int | None, weights: str = 'raw'
) -> None:
  """Evaluates the run in `workdir` and prints the report."""
  report = evaluate_run(workdir, split, checkpoint, batch_size, weights=weights)
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
  flags.mark_flag_as_required('workdir')
  join = common.define_distributed_flags()  # every process of a job evaluates its share

  def absl_main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    join()
    evaluate(workdir.value, split.value, checkpoint.value, batch_size.value, weights.value)

  common.run_absl(absl_main, __doc__)


if __name__ == '__main__':
  main()
