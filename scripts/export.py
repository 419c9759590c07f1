"""Exports a run's params and batch_stats as flat arrays, for use without fineflax.

    python scripts/export.py --workdir runs/demo --out demo.safetensors
    python scripts/export.py --workdir runs/demo --checkpoint latest --out demo.npz
    python scripts/export.py --workdir runs/demo --checkpoint STEP --out step.npz --overwrite

STEP is a step folder's name in the run's checkpoints/latest/ or best/. Keys are the
'/'-joined paths of the variables tree ('params/backbone/conv1_conv/kernel',
'batch_stats/backbone/conv1_bn/mean'); the arrays are the checkpoint's, float32, bit for
bit. The metadata (`metadata` below: class names, step, the run's config, the temperature
`python -m fineflax.evaluate --calibrate` saved for the checkpoint, ...) goes into a .npz
as one more array, `__metadata__`, a JSON string; into a .safetensors file's metadata
as strings, each value JSON-encoded. docs/checkpoints.md ("Export") shows how to read both.
A calibrated reader divides the logits by `temperature` (null: none was saved for this
checkpoint and step) before the softmax (or the sigmoid of a one-logit head).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from fineflax import config as config_lib
from fineflax.errors import ConfigError, FineflaxError
from fineflax.inference import calibration
from fineflax.pytree import path_str
from fineflax.run.restore import WEIGHTS, RestoredRun, load_run

FORMATS = ('.npz', '.safetensors')
NPZ_METADATA_KEY = '__metadata__'
FORMAT_NAME = 'fineflax-export-1'


def flatten(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """{'params/backbone/conv1_conv/kernel': array, ...} of a variables tree, as host arrays."""
  return {
      path_str(path): np.ascontiguousarray(np.asarray(leaf))
      for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


def metadata(run: RestoredRun, temperature: float | None = None) -> dict[str, Any]:
  """What an export says about where its arrays come from and how to use them (JSON-able
  values); `temperature`: what the logits are to be divided by (None: nothing)."""
  return {
      'format': FORMAT_NAME,
      'step': run.step,
      'checkpoint': run.label,
      'checkpoint_dir': str(run.checkpoint_dir),
      'class_names': list(run.class_names),
      'image_shape': list(run.image_shape),
      'meta': run.meta,
      'config': config_lib.to_dict(run.config),
      'temperature': temperature,
  }


def write_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """`arrays` and, under `__metadata__`, `meta` as a JSON string (np.load reads both
  without pickle)."""
  with open(path, 'wb') as f:  # a file object: np.savez appends no suffix
    np.savez(f, **arrays, **{NPZ_METADATA_KEY: np.array(json.dumps(meta))})


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
  """`arrays` with `meta` in the header, each value JSON-encoded (the format's metadata
  holds strings only)."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  # Bytes written here rather than safetensors' save_file, which makes the file 0600.
  path.write_bytes(save(arrays, metadata={k: json.dumps(v) for k, v in meta.items()}))


WRITERS = {'.npz': write_npz, '.safetensors': write_safetensors}


def check_output(out: Path, overwrite: bool) -> None:
  """ConfigError for an output of an unknown kind, or one that exists (unless `overwrite`)."""
  if out.suffix.lower() not in FORMATS:
    raise ConfigError(
        f'--out {out}: unknown format {out.suffix!r}; expected a file ending '
        f'in {" or ".join(FORMATS)}'
    )
  if out.is_dir():
    raise ConfigError(f'--out {out}: is a directory')
  if out.exists() and not overwrite:
    raise ConfigError(f'--out {out}: the file exists; pass --overwrite to replace it')
  if not out.parent.is_dir():
    raise ConfigError(f'--out {out}: no such directory {out.parent}')


def export(
    workdir: str | os.PathLike,
    checkpoint: str,
    out: str | os.PathLike,
    overwrite: bool = False,
    weights: str = 'raw',
) -> tuple[RestoredRun, dict[str, np.ndarray], float | None]:
  """Writes the params and batch_stats of a run's checkpoint to `out` (.npz or
  .safetensors); `weights` 'ema': the parameters' moving average (config.ema). The
  temperature `evaluate --calibrate` saved for the checkpoint (at its step) goes into the
  metadata. Returns the run, the arrays written and that temperature (None: none).

  Raises:
    ConfigError: a bad output path, or what `load_run` raises (no such run or checkpoint).
  """
  out = Path(out)
  check_output(out, overwrite)
  run = load_run(workdir, checkpoint, weights)
  arrays = flatten(run.variables)
  temperature, note = calibration.saved_temperature(workdir, run)
  if temperature is None and note is not None:
    print(f'warning: {note}', file=sys.stderr)
  # Written beside, then renamed: an interrupted export leaves no half-written file.
  partial = out.with_name(f'.{out.name}.partial')
  try:
    WRITERS[out.suffix.lower()](partial, arrays, metadata(run, temperature))
    os.replace(partial, out)
  finally:
    partial.unlink(missing_ok=True)
  return run, arrays, temperature


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
  try:
    run, arrays, temperature = export(
        args.workdir, args.checkpoint, args.out, args.overwrite, args.weights
    )
  except (FineflaxError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  values = sum(a.size for a in arrays.values())
  print(
      f'wrote {args.out}: {len(arrays)} arrays ({values:,} values) of {run.checkpoint_dir} '
      f'(step {run.step}, {run.label})'
      + ('' if temperature is None else f'; temperature {temperature:.4f} in its metadata')
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
