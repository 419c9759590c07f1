"""How well a classifier's probabilities are calibrated, and one temperature that calibrates
them (Guo et al. 2017, "On Calibration of Modern Neural Networks").

Expected calibration error: the examples grouped into 15 equal-width bins of top-1
confidence ((0, 1/15], (1/15, 2/15], ...), each bin's |accuracy - mean confidence|
weighted by its share of the examples. For one logit (a binary sigmoid head) the
confidence is the probability of the predicted class (class 1 above logit 0).

Temperature scaling divides the logits by one T > 0 fitted to minimise the validation
split's NLL: the predicted classes stay as they are, only the confidence changes. The
temperature is saved in `DIR/calibration.json` under the checkpoint's label ('best',
'latest-ema', ...) with its step, so that predict and export apply it to that checkpoint
only.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fineflax.errors import ConfigError, DataError
from fineflax.run import RunDir, reporting, restore

ECE_BINS = 15
# T is searched in [1/100, 100]: a split that one sign of the logits separates perfectly
# has its NLL fall towards T -> 0, and its T is the bound.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-2, 1e2


def _sigmoid(x: np.ndarray) -> np.ndarray:
  # exp of a non-positive number only: no overflow for large |x|.
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(top-1 confidence, predicted class) of each row of `logits` (n, outputs), float64:
  the largest softmax probability and its class; for one logit, the sigmoid's probability
  of the class predicted (class 1 above logit 0, as training's accuracy decides)."""
  logits = np.asarray(logits, np.float64)
  if logits.shape[-1] == 1:
    z = logits[:, 0]
    predicted = (z > 0).astype(np.int64)
    return _sigmoid(np.where(predicted == 1, z, -z)), predicted
  predicted = np.argmax(logits, axis=-1)
  top = np.take_along_axis(_log_softmax(logits), predicted[:, None], axis=-1)[:, 0]
  return np.exp(top), predicted


def reliability(logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
  """The reliability diagram's bins and the expected calibration error of one split.

  Returns:
    {'ece', 'bins', 'count' (per bin), 'accuracy' and 'confidence' (per bin, None where
    the bin is empty)}.
  """
  conf, predicted = confidence(logits)
  correct = (predicted == np.asarray(labels)).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  # Bin i holds (edges[i], edges[i + 1]]: a confidence on an edge goes to the bin below.
  index = np.searchsorted(edges[1:-1], conf, side='left')
  count = np.bincount(index, minlength=bins)
  hits = np.bincount(index, weights=correct, minlength=bins)
  total = np.bincount(index, weights=conf, minlength=bins)
  filled = count > 0
  accuracy = np.where(filled, hits / np.maximum(count, 1), np.nan)
  mean_conf = np.where(filled, total / np.maximum(count, 1), np.nan)
  gap = np.abs(hits - total)  # = count x |accuracy - confidence| of the bin
  n = len(conf)
  return {
      'ece': float(gap.sum() / n) if n else float('nan'),
      'bins': bins,
      'count': count.tolist(),
      'accuracy': [None if np.isnan(a) else float(a) for a in accuracy],
      'confidence': [None if np.isnan(c) else float(c) for c in mean_conf],
  }


def expected_calibration_error(
    logits: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
  """The expected calibration error of `logits` on `labels` (`bins` equal-width bins)."""
  return reliability(logits, labels, bins)['ece']


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
  """Mean negative log-likelihood of `labels` under softmax(logits / T) (one logit:
  sigmoid), in float64, without label smoothing."""
  z = np.asarray(logits, np.float64) / temperature
  labels = np.asarray(labels)
  if not len(labels):
    return float('nan')
  if z.shape[-1] == 1:
    signed = np.where(labels > 0, z[:, 0], -z[:, 0])
    return float(np.mean(np.logaddexp(0.0, -signed)))  # softplus(-signed) = -log sigmoid
  return float(-np.mean(_log_softmax(z)[np.arange(len(labels)), labels]))


def _slope_and_curvature(z: np.ndarray, labels: np.ndarray, beta: float) -> tuple[float, float]:
  """d/dβ and d²/dβ² of the NLL of softmax(β z): the NLL is convex in β = 1/T (a
  log-sum-exp of functions linear in β), so its slope grows with β."""
  if z.shape[-1] == 1:
    s = np.where(labels > 0, z[:, 0], -z[:, 0])
    p = _sigmoid(beta * s)
    return float(np.mean(-s * (1 - p))), float(np.mean(s * s * p * (1 - p)))
  p = np.exp(_log_softmax(beta * z))
  mean = (p * z).sum(-1)
  variance = (p * z * z).sum(-1) - mean**2
  return float(np.mean(mean - z[np.arange(len(labels)), labels])), float(np.mean(variance))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
  """The temperature T that minimises `nll(logits / T)`, in [1/100, 100], in float64.

  Newton's method on β = 1/T, kept inside a bracket of the slope's sign change (bisection
  when a step leaves it): the NLL is convex in β, so the root of its slope is the minimum.

  Raises:
    DataError: no example.
  """
  z = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  if not len(labels):
    raise DataError('cannot fit a temperature on a split with no example')
  lo, hi = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
  if _slope_and_curvature(z, labels, lo)[0] >= 0:
    return MAX_TEMPERATURE
  if _slope_and_curvature(z, labels, hi)[0] <= 0:
    return MIN_TEMPERATURE
  beta = 1.0
  for _ in range(200):
    slope, curvature = _slope_and_curvature(z, labels, beta)
    if slope > 0:
      hi = beta
    else:
      lo = beta
    step = beta - slope / curvature if curvature > 0 else None
    following = step if step is not None and lo < step < hi else (lo + hi) / 2
    if abs(following - beta) <= 1e-13 * beta or hi - lo <= 1e-13 * hi:
      beta = following
      break
    beta = following
  return float(1 / beta)


def calibrate(
    workdir: Any,
    run: restore.RestoredRun,
    val: tuple[np.ndarray, np.ndarray],
    val_name: str,
    tta: str,
    logits: np.ndarray,
    labels: np.ndarray,
) -> dict[str, Any]:
  """The temperature fitted on `val` (logits, labels; the split `val_name`), saved for
  `run`'s checkpoint, and the evaluated split's (`logits`, `labels`) ECE and NLL before
  and after it (and its reliability bins after, for the diagram)."""
  temperature = fit_temperature(*val)
  fitted = {
      'temperature': temperature,
      'fitted_on': val_name,
      'fitted_examples': len(val[1]),
      'tta': tta,
      'fitted_nll_before': nll(*val),
      'fitted_nll_after': nll(*val, temperature),
  }
  save_temperature(workdir, run, fitted)
  scaled = np.asarray(logits, np.float64) / temperature
  after = reliability(scaled, labels)
  return {
      **fitted,
      'before': {'ece': expected_calibration_error(logits, labels), 'nll': nll(logits, labels)},
      'after': {'ece': after['ece'], 'nll': nll(logits, labels, temperature)},
      'reliability_after': {k: v for k, v in after.items() if k != 'ece'},
  }


def _read(workdir: Any) -> dict[str, Any]:
  """The run's calibration.json ({} when there is none)."""
  path = RunDir(workdir).calibration_json
  if not path.exists():
    return {}
  try:
    saved = json.loads(path.read_text())
  except ValueError as e:
    raise ConfigError(f'{path}: not a calibration file ({e}); delete it to start afresh') from None
  if not isinstance(saved, dict):
    raise ConfigError(f'{path}: not a calibration file (expected an object of checkpoints)')
  return saved


def save_temperature(workdir: Any, run: restore.RestoredRun, entry: dict[str, Any]) -> str:
  """Records `entry` (temperature, step, what it was fitted on) under `run.label` in the
  run's calibration.json, the other checkpoints' entries kept; returns the file's path."""
  saved = _read(workdir)
  saved[run.label] = {
      **entry,
      'step': run.step,
      'checkpoint_dir': str(run.checkpoint_dir),
      'weights': run.weights,
  }
  path = RunDir(workdir).calibration_json
  reporting.write_json(path, saved)
  return str(path)


def saved_temperature(workdir: Any, run: restore.RestoredRun) -> tuple[float | None, str | None]:
  """The temperature `evaluate --calibrate` saved for this checkpoint, and a line saying
  where it comes from; (None, None) when none was saved under its label, (None, why) when
  the one there was fitted on another step (the label 'best' or 'latest' moved on since)
  and so does not apply."""
  entry = _read(workdir).get(run.label)
  path = RunDir(workdir).calibration_json
  if entry is None:
    return None, None
  if entry.get('step') != run.step:
    return None, (
        f'{path}: the temperature of checkpoint {run.label} was fitted at step '
        f"{entry.get('step')}, the checkpoint is now step {run.step}: not applied (run "
        'evaluate --calibrate again)'
    )
  temperature = float(entry['temperature'])
  return temperature, f'temperature {temperature:.4f} ({path})'
