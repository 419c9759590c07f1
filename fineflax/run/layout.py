"""What a run folder holds, named in one place (docs/checkpoints.md describes each file).

DIR/config.json                  the resolved config
DIR/dataset.json                 class names, image shape, split sizes
DIR/metrics.jsonl                one record per epoch
DIR/results.json                 the test split's metrics at the end
DIR/history.png, samples.png     training curves; augmented train images
DIR/tb/                          TensorBoard event files
DIR/checkpoints/latest/<step>/   the last saves, for resuming
DIR/checkpoints/best/<step>/     the best save by config.checkpoint.monitor
DIR/checkpoints/phase_best/<step>/  the best epoch of a restore_best phase
DIR/checkpoints/phase_end/<step>/   the parameters each phase but the last ended with
DIR/checkpoints/wise_ft/<step>/  the WiSE-FT interpolation chosen on the validation split
DIR/checkpoints/soup/<step>/     a soup's averaged weights (a folder fineflax.soup wrote)
DIR/wise_ft.png                  validation accuracy against the interpolation's alpha
DIR/features/<role>.npy          cached features memory-mapped from disk (for a gs://
                                 DIR, in a local folder: see storage.local_cache_folder)
DIR/eval/<split>-<checkpoint>.json, -confusion.png, -reliability.png, -predictions.npz
                                 evaluate's report
DIR/calibration.json             temperatures evaluate --calibrate fitted, per checkpoint
"""

from __future__ import annotations

import dataclasses
import os
import re

from etils import epath

from fineflax import storage


@dataclasses.dataclass(frozen=True)
class RunDir:
  """A run folder (a local path or gs://BUCKET/PATH) and the path of everything in it."""

  root: epath.Path

  def __init__(self, root: str | os.PathLike):
    """Raises ConfigError for a URL whose scheme a run folder cannot have (s3://, ...)."""
    object.__setattr__(self, 'root', storage.as_path(root))

  def __fspath__(self) -> str:
    return os.fspath(self.root)

  @property
  def config_json(self) -> epath.Path:
    return self.root / 'config.json'

  @property
  def dataset_json(self) -> epath.Path:
    return self.root / 'dataset.json'

  @property
  def metrics_jsonl(self) -> epath.Path:
    return self.root / 'metrics.jsonl'

  @property
  def results_json(self) -> epath.Path:
    return self.root / 'results.json'

  @property
  def history_png(self) -> epath.Path:
    return self.root / 'history.png'

  @property
  def samples_png(self) -> epath.Path:
    return self.root / 'samples.png'

  @property
  def tensorboard(self) -> epath.Path:
    return self.root / 'tb'

  @property
  def checkpoints(self) -> epath.Path:
    """The folder of the checkpoint folders."""
    return self.root / 'checkpoints'

  @property
  def latest(self) -> epath.Path:
    return self.checkpoints / 'latest'

  @property
  def best(self) -> epath.Path:
    return self.checkpoints / 'best'

  @property
  def phase_best(self) -> epath.Path:
    return self.checkpoints / 'phase_best'

  @property
  def phase_end(self) -> epath.Path:
    return self.checkpoints / 'phase_end'

  @property
  def wise_ft(self) -> epath.Path:
    return self.checkpoints / 'wise_ft'

  @property
  def soup(self) -> epath.Path:
    return self.checkpoints / 'soup'

  @property
  def wise_ft_png(self) -> epath.Path:
    return self.root / 'wise_ft.png'

  @property
  def features(self) -> epath.Path:
    """Memory-mapped arrays need a local disk: for a gs:// run, a local folder."""
    return storage.local_cache_folder(self.root / 'features', 'features')

  @property
  def calibration_json(self) -> epath.Path:
    """The temperatures `evaluate --calibrate` fitted, per checkpoint label."""
    return self.root / 'calibration.json'

  def eval_stem(self, split: str, checkpoint_label: str) -> epath.Path:
    """Where evaluate's report of a split and checkpoint goes, less the suffix."""
    # Split names such as tfds' 'train[:40%]' would make awkward file names.
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_')
    return self.root / 'eval' / f'{name}-{checkpoint_label}'
