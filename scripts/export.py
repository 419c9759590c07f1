"""Exports a run's params and batch_stats as flat arrays: `python -m fineflax.export
--format npz|safetensors` with the format taken from the file's suffix.

    python scripts/export.py --workdir runs/demo --out demo.safetensors
    python scripts/export.py --workdir runs/demo --checkpoint latest --out demo.npz
    python scripts/export.py --workdir runs/demo --checkpoint STEP --out step.npz --overwrite

Keys and metadata: fineflax/export/arrays.py; docs/checkpoints.md ("Export") shows how
to read both, and the other formats (SavedModel, LiteRT, StableHLO) `python -m
fineflax.export` writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from fineflax.errors import ConfigError, FineflaxError
from fineflax.export import arrays, exporter
from fineflax.run.restore import WEIGHTS

FORMATS = ('.npz', '.safetensors')
NPZ_METADATA_KEY = arrays.NPZ_METADATA_KEY


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (errors are one line on stderr)."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--workdir', required=True, help='The run directory.')
  parser.add_argument(
      '--checkpoint',
      default='best',
      help="'best' (default; else the latest), 'latest' or a step number.",
  )
  parser.add_argument(
      '--weights',
      default='raw',
      choices=WEIGHTS,
      help="The checkpoint's parameters ('raw', default) or their moving average ('ema').",
  )
  parser.add_argument('--out', required=True, help='FILE.npz or FILE.safetensors to write.')
  parser.add_argument('--overwrite', action='store_true', help='Replace an existing --out.')
  args = parser.parse_args(argv)
  out = Path(args.out)
  try:
    if out.suffix.lower() not in FORMATS:
      raise ConfigError(
          f'--out {out}: unknown format {out.suffix!r}; expected a file ending '
          f'in {" or ".join(FORMATS)}'
      )
    report = exporter.export(
        args.workdir,
        out.suffix.lower()[1:],
        out,
        checkpoint=args.checkpoint,
        weights=args.weights,
        overwrite=args.overwrite,
    )
  except (FineflaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  run = report.run
  print(
      f'wrote {args.out}: {report.size_bytes:,} bytes of {run.checkpoint_dir} '
      f'(step {run.step}, {run.label})'
      + (
          ''
          if report.temperature is None
          else f'; temperature {report.temperature:.4f} in its metadata'
      )
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
