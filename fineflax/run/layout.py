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
    DIR/checkpoints/<step>/          layout-1 runs of an early fineflax (read only)
    DIR/features/<role>.npy          cached features memory-mapped from disk
    DIR/eval/<split>-<checkpoint>.json, -confusion.png, -predictions.npz   evaluate's report
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from fineflax.errors import ConfigError


_URL = re.compile(r'^([a-zA-Z][a-zA-Z0-9+.-]*)://')


@dataclasses.dataclass(frozen=True)
class RunDir:
  """A run folder and the path of everything in it."""

  root: Path

  def __init__(self, root: str | os.PathLike):
    """Raises ConfigError for a URL (gs://, s3://, ...): it would become a local folder."""
    scheme = _URL.match(os.fspath(root)) if isinstance(root, (str, os.PathLike)) else None
    if scheme:
      # pathlib would turn 'gs://b/r' into the local folder 'gs:/b/r'; Orbax would then
      # fail at the first save, after an epoch of training.
      raise ConfigError(f'{os.fspath(root)}: {scheme.group(1)}:// run folders are not '
                        'supported yet; use a local folder or a mounted bucket (gcsfuse)')
    object.__setattr__(self, 'root', Path(root))

  def __fspath__(self) -> str:
    return os.fspath(self.root)

  @property
  def config_json(self) -> Path:
    return self.root / 'config.json'

  @property
  def dataset_json(self) -> Path:
    return self.root / 'dataset.json'

  @property
  def metrics_jsonl(self) -> Path:
    return self.root / 'metrics.jsonl'

  @property
  def results_json(self) -> Path:
    return self.root / 'results.json'

  @property
  def history_png(self) -> Path:
    return self.root / 'history.png'

  @property
  def samples_png(self) -> Path:
    return self.root / 'samples.png'

  @property
  def tensorboard(self) -> Path:
    return self.root / 'tb'

  @property
  def checkpoints(self) -> Path:
    """The folder of the checkpoint folders (and, in layout-1 runs, of the steps)."""
    return self.root / 'checkpoints'

  @property
  def latest(self) -> Path:
    return self.checkpoints / 'latest'

  @property
  def best(self) -> Path:
    return self.checkpoints / 'best'

  @property
  def phase_best(self) -> Path:
    return self.checkpoints / 'phase_best'

  @property
  def features(self) -> Path:
    return self.root / 'features'

  def eval_stem(self, split: str, checkpoint_label: str) -> Path:
    """Where evaluate's report of a split and checkpoint goes, less the suffix."""
    # Split names such as tfds' 'train[:40%]' would make awkward file names.
    name = re.sub(r'[^A-Za-z0-9_.-]+', '_', split).strip('_')
    return self.root / 'eval' / f'{name}-{checkpoint_label}'
