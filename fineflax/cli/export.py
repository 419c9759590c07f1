"""Exports a run's checkpoint for serving without fineflax, checked against fineflax.

    python -m fineflax.export --workdir runs/demo --format saved_model --out demo_savedmodel
    python -m fineflax.export --workdir runs/demo --format litert --out demo.tflite
    python -m fineflax.export --workdir runs/demo --format litert --quantize dynamic --out q.tflite
    python -m fineflax.export --workdir runs/demo --format stablehlo --out demo.stablehlo
    python -m fineflax.export --workdir runs/demo --format safetensors --out demo.safetensors

Each model takes uint8 images (batch, H, W, 3) at the run's image size and returns class
probabilities (the temperature `evaluate --calibrate` saved applied; LoRA merged;
BatchNormalization folded; float32). After writing, the file is run by its own runtime on
a batch of the run's validation images and compared with fineflax's forward pass: the
largest probability difference is printed and a float32 export above 1e-5 refused.
docs/checkpoints.md ("Export") shows how to load each format.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fineflax.errors import FineflaxError
from fineflax.export import exporter
from fineflax.run.restore import WEIGHTS


def parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  p = argparse.ArgumentParser(
      prog='python -m fineflax.export',
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--workdir', required=True, help='The run directory.')
  p.add_argument(
      '--checkpoint',
      default='best',
      help="'best' (default; else the latest), 'latest', 'wise_ft', 'soup' or a step number.",
  )
  p.add_argument('--weights', default='raw', choices=WEIGHTS, help="'raw' or 'ema' parameters.")
  p.add_argument('--format', required=True, help=f'One of {", ".join(exporter.FORMATS)}.')
  p.add_argument('--out', required=True, help='The file (a folder for saved_model) to write.')
  p.add_argument('--overwrite', action='store_true', help='Replace an existing --out.')
  p.add_argument('--quantize', default=None, help="litert only: 'dynamic' (int8 weights).")
  p.add_argument(
      '--no-fold', dest='fold', action='store_false', help='Keep BatchNormalization unfolded.'
  )
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (errors are one line on stderr)."""
  args = parser().parse_args(argv)
  try:
    report = exporter.export(
        args.workdir,
        args.format,
        args.out,
        checkpoint=args.checkpoint,
        weights=args.weights,
        overwrite=args.overwrite,
        quantize=args.quantize,
        fold=args.fold,
    )
  except (FineflaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  run = report.run
  line = (
      f'wrote {report.out} ({report.format}, {report.size_bytes / 1e6:.2f} MB) of '
      f'{run.checkpoint_dir} (step {run.step}, {run.label})'
  )
  if report.folded:
    line += f'; {report.folded} BatchNormalization layers folded'
  if report.temperature is not None:
    line += f'; temperature {report.temperature:.4f} applied'
  print(line)
  if report.max_abs_diff is not None:
    print(f'check: max |probability - fineflax| = {report.max_abs_diff:.3g}', end='')
    if report.top1_agreement is not None:
      print(f'; top-1 agreement {report.top1_agreement:.3f}', end='')
      if report.accuracy_change is not None:
        print(f'; accuracy change {report.accuracy_change:+.4f}', end='')
    else:
      print(f' (tolerance {exporter.TOLERANCE:g})', end='')
    print()
  return 0


if __name__ == '__main__':
  sys.exit(main())
