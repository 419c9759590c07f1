"""`export`: a run's checkpoint written in one format, then run back by that format's
runtime and compared with fineflax's own forward pass before it is kept.

The check: a batch of the run's validation images (random uint8 ones when the data is
not there) through fineflax's `predict_fn` (float32) and through the written file; the
largest absolute difference of the probabilities is reported, and a float32 export above
`TOLERANCE` is refused (its file removed). A `quantize='dynamic'` LiteRT export reports
instead how often its top class differs and the change of accuracy on those images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fineflax import data
from fineflax.errors import ConfigError
from fineflax.export import arrays as arrays_lib, formats, serving as serving_lib
from fineflax.inference import calibration
from fineflax.run.restore import RestoredRun, load_run

TOLERANCE = 1e-5  # max |p_export - p_fineflax| of a float32 export
FORMATS = ('stablehlo', 'saved_model', 'litert', 'onnx', 'keras', 'npz', 'safetensors')
QUANTIZE = ('dynamic',)  # litert only
CHECK_BATCH = 8


@dataclasses.dataclass(frozen=True)
class Report:
  """What an export wrote and how it compared (`max_abs_diff` None: not run back, the
  array formats; `accuracy_change`: a quantized export's, on the check batch)."""

  out: Path
  format: str
  run: RestoredRun
  temperature: float | None
  folded: int
  max_abs_diff: float | None
  top1_agreement: float | None = None
  accuracy_change: float | None = None
  size_bytes: int = 0


def check_request(fmt: str, out: Path, overwrite: bool, quantize: str | None) -> None:
  """ConfigError for an unknown format, a bad --quantize, or an --out that exists (unless
  `overwrite`) or whose folder does not."""
  if fmt not in FORMATS:
    raise ConfigError(f'--format {fmt!r}: unknown format; expected one of {", ".join(FORMATS)}')
  if quantize is not None and (quantize not in QUANTIZE or fmt != 'litert'):
    raise ConfigError(
        f'--quantize {quantize!r}: only --format litert is quantized, with '
        f'{" or ".join(QUANTIZE)}'
    )
  if fmt == 'keras' and out.suffix != '.keras':
    raise ConfigError(f'--out {out}: a Keras file must end in .keras')
  if out.exists() and not overwrite:
    raise ConfigError(f'--out {out}: exists; pass --overwrite to replace it')
  if not out.parent.is_dir():
    raise ConfigError(f'--out {out}: no such directory {out.parent}')


def check_images(run: RestoredRun, n: int = CHECK_BATCH) -> tuple[np.ndarray, Any]:
  """`n` validation images of the run and their labels, or (when its data cannot be
  read) random uint8 images and None."""
  key = 'val_split' if run.config.data.val_split is not None else 'test_split'
  try:
    split = data.load_dataset(run.config.data, [key]).splits.get(run.config.data[key])
    if isinstance(split, data.Split) and len(split.images):
      return np.asarray(split.images[:n], np.uint8), np.asarray(split.labels[:n])
  except Exception:  # pylint: disable=broad-except
    pass  # data not there (another machine, a deleted folder): random images do
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, (n, *run.image_shape), dtype=np.uint8), None


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path)
  else:
    path.unlink(missing_ok=True)


def export(
    workdir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    checkpoint: str = 'best',
    weights: str = 'raw',
    overwrite: bool = False,
    quantize: str | None = None,
    fold: bool = True,
    images: np.ndarray | None = None,
) -> Report:
  """Writes checkpoint `checkpoint` of the run in `workdir` as `fmt` to `out`, checked.

  `images`: the check batch (default: `check_images`). Raises ConfigError: a bad request,
  what `load_run` raises (no such run or checkpoint), an export off by more than
  TOLERANCE, a missing optional dependency.
  """
  out = Path(out)
  check_request(fmt, out, overwrite, quantize)
  run = load_run(workdir, checkpoint, weights)
  temperature, note = calibration.saved_temperature(workdir, run)
  if temperature is None and note is not None:
    print(f'warning: {note}', file=sys.stderr)
  # Written beside, then renamed: an interrupted export leaves no half-written output.
  partial = out.with_name(f'.partial-{out.name}')  # keeps the suffix Keras checks
  _remove(partial)
  try:
    if fmt in arrays_lib.WRITERS:  # the checkpoint's arrays as they are: nothing to run
      meta = serving_lib.metadata(run, temperature)
      arrays_lib.WRITERS[fmt](partial, arrays_lib.flatten(run.variables), meta)
      report = Report(out, fmt, run, temperature, 0, None)
    else:
      serving = serving_lib.make_serving(run, temperature, fold=fold)
      meta = dict(serving.metadata, exported_format=fmt, quantize=quantize)
      serving = dataclasses.replace(serving, metadata=meta)
      formats.WRITERS[fmt](serving, partial, quantize)
      report = _checked(run, fmt, partial, temperature, serving, quantize, images, out)
    if out.exists():
      _remove(out)
    os.replace(partial, out)
    if fmt in formats.WRITERS and fmt != 'saved_model':
      formats.sidecar(out).write_text(json.dumps(meta))
  finally:
    _remove(partial)
  size = sum(f.stat().st_size for f in out.rglob('*')) if out.is_dir() else out.stat().st_size
  return dataclasses.replace(report, size_bytes=size)


def _checked(
    run: RestoredRun,
    fmt: str,
    path: Path,
    temperature: float | None,
    serving: serving_lib.Serving,
    quantize: str | None,
    images: np.ndarray | None,
    out: Path,
) -> Report:
  """The export at `path` run by its runtime on the check batch and compared with
  fineflax's forward pass; ConfigError above TOLERANCE (a float32 export)."""
  labels = None
  if images is None:
    images, labels = check_images(run)
  expected = serving_lib.reference(run, images, temperature)
  got = np.asarray(formats.RUNNERS[fmt](path)(images))
  if got.shape != expected.shape:
    raise ConfigError(f'{out}: the {fmt} export gives shape {got.shape}, not {expected.shape}')
  diff = float(np.abs(got - expected).max())
  folded = 0 if fmt == 'keras' else serving.folded  # the Keras model keeps its BN
  report = Report(out, fmt, run, temperature, folded, diff)
  if quantize is not None:
    agree = float(np.mean(got.argmax(-1) == expected.argmax(-1)))
    change = None
    if labels is not None:
      change = float(np.mean(got.argmax(-1) == labels) - np.mean(expected.argmax(-1) == labels))
    return dataclasses.replace(report, top1_agreement=agree, accuracy_change=change)
  if not diff <= TOLERANCE:
    raise ConfigError(
        f'{out}: the {fmt} export differs from fineflax by {diff:.3g} in probability '
        f'(tolerance {TOLERANCE:g}); not written'
    )
  return report
