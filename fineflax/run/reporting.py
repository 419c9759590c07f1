"""What a run reports: `metrics.jsonl` (one JSON object per epoch) and log lines.

Only process 0 writes files, so a multi-host run has one record of each epoch.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
from typing import Any, Callable, Sequence

import jax
from absl import logging as absl_logging

from fineflax import storage
from fineflax.run import RunDir

logger = logging.getLogger('fineflax.reporting')


def _orbax_wait_notice(record: logging.LogRecord) -> bool:
  """False for Orbax's "Waiting for previous save to complete took X seconds" warning.

  A run saves once an epoch, so a save waits for the previous one only when an epoch is
  shorter than a save: on smoke runs, where the warning is noise.
  """
  return not str(record.msg).startswith('Waiting for previous save')


def setup_logging() -> None:
  """fineflax's progress at INFO on stderr; the libraries' (Orbax logs every file it
  writes) at WARNING."""
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logger = logging.getLogger('absl')  # Orbax logs through absl
  if _orbax_wait_notice not in absl_logger.filters:
    absl_logger.addFilter(_orbax_wait_notice)
  logger = logging.getLogger('fineflax')
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    logger.addHandler(handler)
    logger.propagate = False
  logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)


class MetricsLog:
  """Appends epoch records (and per-step ones, marked `"kind": "step"`) to
  `DIR/metrics.jsonl`.

  An object store cannot append: there the whole file is written again with each record
  (this writer keeps its text), in a thread of its own, so that the training loop does not
  wait a network round trip for each record; a write waits for the one before it, and a
  read for every write.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = RunDir(workdir).metrics_jsonl
    self._text: str | None = None  # the file's text, for rewriting it on an object store
    self._uploads: concurrent.futures.ThreadPoolExecutor | None = None
    self._pending: concurrent.futures.Future | None = None

  def read(self) -> list[dict[str, Any]]:
    """Every epoch record written so far."""
    return [r for r in self._read_all() if r.get('kind') != 'step']

  def read_steps(self) -> list[dict[str, Any]]:
    """Every per-step record written so far (`config.report.every_steps`)."""
    return [r for r in self._read_all() if r.get('kind') == 'step']

  def _read_all(self) -> list[dict[str, Any]]:
    self.wait()
    if not self.path.exists():
      return []
    records = []
    for line in self.path.read_text().splitlines():
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        # Only the last line can be cut short (a full disk during the append); the
        # epoch it recorded is redone after the resume.
        logger.warning('%s: ignoring a damaged record: %r', self.path, line[:80])
    return records

  def truncate_after(self, step: int) -> None:
    """Drops records of steps after `step`: the epochs a resumed run will redo."""
    if jax.process_index() != 0 or not self.path.exists():
      return
    kept = [r for r in self._read_all() if r['step'] <= step]
    self._text = ''.join(json.dumps(r) + '\n' for r in kept)
    storage.write_atomic(self.path, self._text)

  def wait(self) -> None:
    """Blocks until every record is written (raises the error of one that failed)."""
    pending, self._pending = self._pending, None
    if pending is not None:
      pending.result()

  def write(self, record: dict[str, Any]) -> None:
    """Adds `record` (process 0 only)."""
    if jax.process_index() != 0:
      return
    line = json.dumps(record) + '\n'
    if storage.is_local(self.path):
      with self.path.open('a') as f:
        f.write(line)
      return
    if self._text is None:
      self._text = self.path.read_text() if self.path.exists() else ''
    self._text += line
    self.wait()
    if self._uploads is None:
      self._uploads = concurrent.futures.ThreadPoolExecutor(1, 'metrics-upload')
    self._pending = self._uploads.submit(storage.write_atomic, self.path, self._text)


def split_metrics(
    evaluate: Callable[[Any, str], dict[str, float]], variables: Any, roles: Sequence[str]
) -> dict[str, Any]:
  """`{role}_loss`, `{role}_accuracy` and `{role}_examples` of `variables` on each split
  of `roles`, as results.json records them (`evaluate(variables, role)`: loss, accuracy,
  count)."""
  out = {}
  for role in roles:
    found = evaluate(variables, role)
    out.update(
        {
            f'{role}_loss': found['loss'],
            f'{role}_accuracy': found['accuracy'],
            f'{role}_examples': found['count'],
        }
    )
  return out


def epoch_line(record: dict[str, Any], epochs_in_phase: int) -> str:
  """A one-line summary of an epoch record for the log."""
  val = (
      ''
      if record['val_loss'] is None
      else f"val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f} | "
  )
  if record.get('val_accuracy_ema') is not None:
    val = f"{val[:-2]}(EMA: {record['val_loss_ema']:.4f} {record['val_accuracy_ema']:.4f}) | "
  return (
      f"[{record['phase']}] epoch {record['phase_epoch']}/{epochs_in_phase} "
      f"(run epoch {record['epoch']}, step {record['step']}): "
      f"loss {record['loss']:.4f} accuracy {record['accuracy']:.4f} | {val}"
      f"{record['images_per_sec']:.0f} img/s"
  )


def measured_parameters(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """('final parameters', results.json's final record), ('best checkpoint', its best
  record) when that is another step, and ('EMA weights', its ema record) when the run kept
  a moving average: the parameters a run's figures were measured with."""
  out = [('final parameters', results['final'])]
  best = results.get('best')
  if best and best['step'] != results['final']['step']:
    out.append(('best checkpoint', best))
  if results.get('ema'):
    out.append(('EMA weights', results['ema']))
  return out


def run_summary(folder: RunDir, results: dict[str, Any]) -> str:
  """The lines a run ends with: where it stopped, its final and best validation figures
  and test figures, each with its step and checkpoint, and the commands that reuse it
  (evaluate offering the splits the run has)."""
  lines = [
      f"run finished at step {results['step']} (epoch {results['epoch']}); "
      f'results in {folder.results_json}'
  ]
  final = results['final']
  validated = 'val_loss' in final
  if validated:
    lines.append(
        f"  final parameters, step {final['step']}: val_loss {final['val_loss']:.4f} "
        f"val_accuracy {final['val_accuracy']:.4f} ({folder.latest})"
    )
  ema = results.get('ema')
  if validated and ema:
    lines.append(
        f"  EMA weights, step {ema['step']}: val_loss {ema['val_loss']:.4f} "
        f"val_accuracy {ema['val_accuracy']:.4f} (--weights ema)"
    )
  best = results.get('best')
  if best:
    lines.append(
        f"  best checkpoint, step {best['step']}: {best['monitor']} "
        f"{best['value']:.4f} ({folder.root / best['dir']})"
    )
  for label, record in measured_parameters(results):
    if 'test_accuracy' in record:
      lines.append(
          f"  test split, {label} (step {record['step']}): accuracy "
          f"{record['test_accuracy']:.4f}, loss {record['test_loss']:.4f} "
          f"({record['test_examples']} examples)"
      )
  tested = 'test_accuracy' in results['final']
  roles = ['train'] + ['val'] * validated + ['test'] * tested
  # Without a test split `--split` is needed: evaluate's default split is the test split.
  split = f'[--split {"|".join(roles)}]' if tested else f'--split {"|".join(roles)}'
  lines += [
      f'  evaluate: python -m fineflax.evaluate --workdir {folder.root} {split} '
      '[--checkpoint best|latest|STEP]' + (' [--weights ema]' if ema else ''),
      f'  predict:  python -m fineflax.predict --workdir {folder.root} IMAGE...',
  ]
  return '\n'.join(lines)


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as JSON atomically (process 0 only)."""
  if jax.process_index() != 0:
    return
  storage.write_atomic(storage.as_path(path), json.dumps(obj, indent=2) + '\n')
