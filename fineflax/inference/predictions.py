"""What a prediction on image files gives: every file's top-k classes or its error, and
what predicted them (`Predictions`), written as .csv or .json (`write_predictions`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from fineflax.errors import ConfigError

Ranked = list[tuple[str, float]]
OUTPUT_SUFFIXES = ('.csv', '.json')


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[Ranked]:
  """Per row, the k most probable (class name, probability), most probable first."""
  order = np.argsort(-probs, axis=-1)[:, :k]
  return [[(class_names[i], float(row[i])) for i in idx] for row, idx in zip(probs, order)]


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Every image file's top-k classes, or why it could not be read, and what predicted them.

  Attributes:
    paths: the files, in the order given.
    top: per file, its (class name, probability), most probable first; None where the
      file could not be read.
    errors: per file, the one-line reason it could not be read; None where it was read.
    workdir, checkpoint, step: the run, and the checkpoint used ('best', 'latest' or
      'step<N>', as `load_run` labels it) and its train step; checkpoint and step are
      None when no file could be read (no checkpoint was opened then).
    weights, backbone: zero-shot: `config.model.weights` (None: random weights) and the
      model.
    temperature: what the logits were divided by (`evaluate --calibrate`'s); None: none.
    tta: the test-time augmentation (`fineflax.inference.tta.MODES`).
  """

  paths: tuple[str, ...]
  top: tuple[Ranked | None, ...]
  errors: tuple[str | None, ...]
  workdir: str | None = None
  checkpoint: str | None = None
  step: int | None = None
  weights: str | None = None
  backbone: str | None = None
  temperature: float | None = None
  tta: str = 'none'

  @property
  def failed(self) -> list[str]:
    """The files that could not be read."""
    return [path for path, error in zip(self.paths, self.errors) if error is not None]

  def source(self) -> str:
    """One line naming the checkpoint (or zero-shot weights) that predicted."""
    if self.workdir is not None:
      if self.checkpoint == f'step{self.step}':
        line = f'{self.workdir}: checkpoint step {self.step}'
      else:
        line = f'{self.workdir}: checkpoint {self.checkpoint} (step {self.step})'
      if self.temperature is not None:
        line += f', temperature {self.temperature:.4f} (evaluate --calibrate)'
      return line + ('' if self.tta == 'none' else f', tta {self.tta}')
    if self.weights is None:
      return f'zero-shot: {self.backbone} with random weights (config.model.weights is None)'
    return f'zero-shot: {self.backbone} with weights {self.weights}'

  def records(self) -> list[dict[str, Any]]:
    """One dict per file (path, workdir, checkpoint, step, weights, top_k, error)."""
    return [
        {
            'path': path,
            'workdir': self.workdir,
            'checkpoint': self.checkpoint,
            'step': self.step,
            'weights': self.weights,
            'top_k': None
            if top is None
            else [{'class': name, 'probability': p} for name, p in top],
            'error': error,
        }
        for path, top, error in zip(self.paths, self.top, self.errors)
    ]


def predictions_of(
    paths: Sequence[str],
    images: list[np.ndarray | None],
    errors: list[str | None],
    predict_readable: Callable[[np.ndarray], tuple[list[Ranked], dict[str, Any]]],
    **source: Any,
) -> Predictions:
  """Predictions for the readable `images` by `predict_readable` (which also says what
  predicted them, as `Predictions` fields), None for the others; nothing runs when no
  file was readable."""
  readable = [i for i, image in enumerate(images) if image is not None]
  top: list[Ranked | None] = [None] * len(paths)
  if readable:
    ranked, more = predict_readable(np.stack([images[i] for i in readable]))
    source.update(more)
    for i, best in zip(readable, ranked):
      top[i] = best
  return Predictions(tuple(paths), tuple(top), tuple(errors), **source)


def check_output_path(path: str | os.PathLike) -> Path:
  """`path` if `write_predictions` can write it (a .csv or .json file), else ConfigError."""
  suffix = Path(path).suffix
  if suffix.lower() not in OUTPUT_SUFFIXES:
    raise ConfigError(
        f'{path}: expected a .csv or .json file, not '
        + (repr(suffix) if suffix else 'a name without suffix')
    )
  return Path(path)


def write_predictions(predictions: Predictions, path: str | os.PathLike) -> None:
  """Writes one row (.csv) or object (.json, a list) per file: path, workdir, checkpoint,
  step, weights, the top-k classes and probabilities, error (empty / null where n/a)."""
  path = check_output_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  records = predictions.records()
  if path.suffix.lower() == '.json':
    path.write_text(json.dumps(records, indent=1) + '\n')
    return
  k = max((len(top) for top in predictions.top if top is not None), default=0)
  ranks = [f'{column}_{i}' for i in range(1, k + 1) for column in ('class', 'probability')]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(
        f, ['path', 'workdir', 'checkpoint', 'step', 'weights', *ranks, 'error']
    )
    writer.writeheader()
    for record in records:
      row = {key: '' if value is None else value for key, value in record.items() if key != 'top_k'}
      for i, entry in enumerate(record['top_k'] or (), 1):
        row[f'class_{i}'], row[f'probability_{i}'] = entry['class'], entry['probability']
      writer.writerow(row)
