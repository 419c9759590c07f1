"""Training-curve, confusion-matrix and reliability-diagram images (PNG).

Figures are built with `matplotlib.figure.Figure` and rendered by the Agg canvas
directly, never through pyplot: pyplot keeps global state (the current figure, the
backend) that a notebook or another library in the same process may rely on.
Files are written atomically (`storage.write_atomic`), so a reader such as an image
viewer refreshing during training never sees half a PNG. Only process 0 writes.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import jax
import numpy as np

from fineflax import storage

_ANNOTATE_MAX_CLASSES = 20  # counts in the cells stay legible up to this many classes
_TICK_LABEL_MAX_CLASSES = 30  # class names on the axes stay legible up to this many


def _figure(**kwargs: Any) -> Any:
  # matplotlib is imported when a plot is drawn, not with the package: it takes a second
  # and is not on every accelerator machine (scripts/benchmark.py runs without it).
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  return Figure(**kwargs)


def _save_atomic(fig: Any, path: str | os.PathLike, dpi: int = 100) -> None:
  """Renders `fig` to `path` as a PNG, which no reader ever sees half written."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top

  FigureCanvasAgg(fig)
  png = io.BytesIO()
  fig.savefig(png, format='png', dpi=dpi)
  storage.write_atomic(storage.as_path(path), png.getvalue())


def _series(records: Sequence[dict[str, Any]], key: str) -> np.ndarray | None:
  """The values of `key` as floats, NaN where missing; None when none is present.

  NaN breaks the line, so an epoch without validation leaves a gap instead of a
  misleading straight segment.
  """
  values = [r.get(key) for r in records]
  if all(v is None for v in values):
    return None
  return np.array([np.nan if v is None else float(v) for v in values])


def _phase_starts(records: Sequence[dict[str, Any]]) -> list[tuple[float, str]]:
  """(epoch, phase name) of the first record of every phase, in run order."""
  starts = []
  for i, record in enumerate(records):
    if i == 0 or record.get('phase_index') != records[i - 1].get('phase_index'):
      starts.append((float(record['epoch']), str(record.get('phase', ''))))
  return starts


def write_history(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
  """Accuracy and loss per run epoch, training vs validation, as Deep Learning with
  Python plots them, with a vertical line where each phase after the first begins.

  Args:
    path: the PNG to write.
    records: epoch records (keys epoch, phase, phase_index, loss, accuracy, val_loss,
      val_accuracy) in run order. Validation values may be None. No records, no file.
  """
  if not records or jax.process_index() != 0:
    return
  epochs = np.array([float(r['epoch']) for r in records])
  starts = _phase_starts(records)
  fig = _figure(figsize=(11, 4.2), layout='constrained')
  for ax, metric, title in zip(fig.subplots(1, 2), ('accuracy', 'loss'), ('Accuracy', 'Loss')):
    # Markers, so that a run of one epoch still shows its point.
    train = _series(records, metric)
    if train is not None:
      ax.plot(epochs, train, 'o-', markersize=3, label='Training')
    val = _series(records, f'val_{metric}')
    if val is not None:
      ax.plot(epochs, val, 's-', markersize=3, label='Validation')
    for i, (epoch, name) in enumerate(starts):
      # The boundary lies between the last epoch of one phase and the first of the next.
      x = epoch - 0.5 if i else epochs[0]
      if i:
        ax.axvline(x, color='grey', linestyle='--', linewidth=1)
      ax.text(
          x,
          1.0,
          f' {name}',
          transform=ax.get_xaxis_transform(),
          va='top',
          ha='left',
          fontsize=8,
          color='dimgrey',
      )
    ax.set_title(title)
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend(loc='best', fontsize=8)
    if len(epochs) < 20:
      ax.set_xticks(epochs)
  _save_atomic(fig, path)


def _cell_text(value: float) -> str:
  return f'{value:.0f}' if float(value).is_integer() else f'{value:.2f}'


def write_confusion(
    path: str | os.PathLike, matrix: np.ndarray, class_names: Sequence[str], title: str = ''
) -> None:
  """A confusion matrix image: rows are true classes, columns predicted classes.

  Cells hold their counts up to 20 classes; axes name the classes up to 30.

  Args:
    path: the PNG to write.
    matrix: (classes, classes) counts (or fractions).
    class_names: one name per row/column.
    title: drawn above the matrix.
  """
  matrix = np.asarray(matrix)
  n = len(class_names)
  if matrix.shape != (n, n):
    raise ValueError(f'confusion matrix of shape {matrix.shape} for {n} class names')
  if jax.process_index() != 0:
    return
  side = float(np.clip(2.5 + 0.45 * n, 4.5, 16))
  fig = _figure(figsize=(side + 1.2, side), layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(matrix, cmap='Blues', interpolation='nearest', vmin=0)
  fig.colorbar(image, ax=ax, shrink=0.8)
  if n <= _TICK_LABEL_MAX_CLASSES:
    ticks = np.arange(n)
    ax.set_xticks(
        ticks,
        [str(c) for c in class_names],
        rotation=45,
        ha='right',
        rotation_mode='anchor',
        fontsize=8,
    )
    ax.set_yticks(ticks, [str(c) for c in class_names], fontsize=8)
  if n <= _ANNOTATE_MAX_CLASSES:
    # White text on dark cells, dark text on light ones.
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
      for j in range(n):
        ax.text(
            j,
            i,
            _cell_text(matrix[i, j]),
            ha='center',
            va='center',
            fontsize=8,
            color='white' if matrix[i, j] > threshold else 'black',
        )
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  if title:
    ax.set_title(title)
  _save_atomic(fig, path)


def write_interpolation(
    path: str | os.PathLike, alphas: Sequence[float], accuracies: Sequence[float], chosen: float
) -> None:
  """Validation accuracy against WiSE-FT's alpha (0: where the interpolation starts, 1:
  where it ends), the chosen alpha marked."""
  if jax.process_index() != 0:
    return
  fig = _figure(figsize=(5, 3.5))
  ax = fig.add_subplot()
  ax.plot(alphas, accuracies, marker='o')
  ax.axvline(chosen, color='tab:red', linestyle='--', label=f'chosen alpha {chosen:g}')
  ax.set_xlabel('alpha (0: start, 1: end of fine-tuning)')
  ax.set_ylabel('validation accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  _save_atomic(fig, path)


def write_reliability(
    path: str | os.PathLike,
    panels: Sequence[tuple[str, float, dict[str, Any]]],
    title: str = '',
) -> None:
  """Reliability diagrams (Guo et al. 2017), one panel per (name, ECE, bins): each
  confidence bin's accuracy as a bar beside the diagonal a calibrated model follows, the
  gap to the bin's mean confidence shaded, the bin's share of examples below.

  Args:
    path: the PNG to write.
    panels: (name, expected calibration error, `calibration.reliability`'s bins: 'bins',
      'count', 'accuracy', 'confidence' with None for an empty bin).
    title: drawn above the panels.
  """
  if jax.process_index() != 0:
    return
  fig = _figure(figsize=(4.2 * len(panels), 5.2), layout='constrained')
  axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=(3, 1), sharex=True)
  for column, (name, ece, bins) in enumerate(panels):
    top, bottom = axes[0, column], axes[1, column]
    n = bins['bins']
    width = 1.0 / n
    lefts = np.arange(n) * width
    filled = [a is not None for a in bins['accuracy']]
    accuracy = np.array([a if a is not None else 0.0 for a in bins['accuracy']])
    confidence = np.array([c if c is not None else 0.0 for c in bins['confidence']])
    top.bar(lefts, accuracy, width, align='edge', edgecolor='black', label='accuracy')
    # The gap between what the bin claims and what it gets, where it has examples.
    gap_low = np.minimum(accuracy, confidence)
    top.bar(
        lefts[filled],
        np.abs(confidence - accuracy)[filled],
        width,
        bottom=gap_low[filled],
        align='edge',
        color='tab:red',
        alpha=0.3,
        edgecolor='tab:red',
        hatch='//',
        label='gap to confidence',
    )
    top.plot([0, 1], [0, 1], linestyle='--', color='grey', label='calibrated')
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel('accuracy')
    top.set_title(f'{name}: ECE {ece:.4f}', fontsize=10)
    top.legend(loc='upper left', fontsize=8)
    counts = np.asarray(bins['count'], np.float64)
    bottom.bar(lefts, counts / max(counts.sum(), 1), width, align='edge', color='grey')
    bottom.set_xlabel('confidence (top-1)')
    bottom.set_ylabel('share')
  if title:
    fig.suptitle(title, fontsize=10)
  _save_atomic(fig, path)
