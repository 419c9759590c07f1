"""WiSE-FT on a finished run (`python -m fineflax.interpolate`; fineflax.train.wise_ft):
the run's splits opened from its folder, then the same search a run with
`config.wise_ft.enabled` makes at its end."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

from fineflax.errors import ConfigError
from fineflax.inference.run_splits import open_run_splits
from fineflax.run import RunDir
from fineflax.train import wise_ft


def interpolate_run(
    workdir: str | os.PathLike,
    start: str | None = None,
    end: str | None = None,
    alphas: Sequence[float] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Interpolates the run's weights between the end of phase `start` and `end` ('final'
  or 'best'), chooses alpha on the validation split, tests it once, and keeps it as the
  run's `wise_ft` checkpoint; returns results.json's `wise_ft` record. None: the run's
  config.wise_ft values.

  Raises:
    ConfigError: no such run, phase or checkpoint; a run without a validation split.
  """
  run = open_run_splits(workdir, devices=devices)
  if not run.has('val'):
    raise ConfigError(
        f'{workdir}: the run has no validation split (config.data.val_split) to choose ' 'alpha on'
    )
  return wise_ft.run_wise_ft(
      RunDir(run.workdir),
      run.config,
      run.abstract,
      run.evaluate,
      run.has('test'),
      start=start,
      end=end,
      alphas=alphas,
  )
