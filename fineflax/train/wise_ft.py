"""WiSE-FT on a run folder: the two ends read from its checkpoints, alpha chosen on the
validation split, the test split measured once, and what was chosen kept as a checkpoint
of the run (checkpoints/wise_ft/), a `wise_ft` record in results.json and a plot.

Called at the end of a run with `config.wise_ft.enabled` (fineflax.train.training), and
by `python -m fineflax.interpolate` on a finished one (fineflax.inference.interpolate):
both read the ends from the checkpoints, so both give the same figures.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

import ml_collections

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.run import RunDir, checkpoints, plots, reporting, restore
from fineflax.train import averaging

logger = logging.getLogger('fineflax.wise_ft')


def _meta(step_dir: Any) -> dict[str, Any]:
  path = step_dir / 'meta' / 'metadata'
  return json.loads(path.read_text()) if path.is_file() else {}


def start_checkpoint(folder: RunDir, config: ml_collections.ConfigDict, phase: str | None) -> Any:
  """The step folder of the end of `phase` (a phase name; None: the first phase)."""
  names = [p.name for p in config.phases]
  if phase is not None and phase not in names:
    raise ConfigError(f'WiSE-FT start {phase!r}: the run has the phases {names}')
  index = 0 if phase is None else names.index(phase)
  if index == len(names) - 1:
    raise ConfigError(
        f'WiSE-FT start {names[index]!r} is the last phase: its end is the end of the run; '
        f'choose an earlier one of {names[:-1]}'
    )
  for step in checkpoints.complete_steps(folder.phase_end):
    step_dir = folder.phase_end / str(step)
    if _meta(step_dir).get('phase_index') == index:
      return step_dir
  raise ConfigError(
      f'{folder.phase_end}: no saved end of phase {names[index]!r} (a run saves it when '
      'the phase ends: has the run got that far?)'
  )


def end_checkpoint(folder: RunDir, end: str) -> Any:
  """The step folder of alpha 1: the final parameters (the last of latest/) or best/."""
  if end not in ('final', 'best'):
    raise ConfigError(f"WiSE-FT end {end!r}: expected 'final' or 'best'")
  step_dir, _ = restore.find_checkpoint(folder.root, 'latest' if end == 'final' else 'best')
  return step_dir


def run_wise_ft(
    folder: RunDir,
    config: ml_collections.ConfigDict,
    expected: dict[str, Any],
    evaluate: averaging.Evaluate,
    has_test: bool,
    *,
    start: str | None = None,
    end: str | None = None,
    alphas: Sequence[float] | None = None,
) -> dict[str, Any]:
  """Interpolates between the end of phase `start` and `end` ('final' or 'best'; None:
  config.wise_ft's), over `alphas`; saves the chosen weights as checkpoints/wise_ft/ and
  returns the `wise_ft` record it adds to results.json.

  Args:
    folder: the run folder.
    config: the run's config.
    expected: the abstract {'params', 'batch_stats'} of its model.
    evaluate: `(variables, role) -> {'loss', 'accuracy', 'count'}` on the run's splits.
    has_test: whether the run has a test split (measured once, with the chosen alpha).
  """
  settings = config.wise_ft
  start = settings.start if start is None else start
  end = settings.end if end is None else end
  alphas = tuple(settings.alphas if alphas is None else alphas)
  start_dir, end_dir = start_checkpoint(folder, config, start), end_checkpoint(folder, end)
  first, _ = restore.read_variables(start_dir, expected)
  last, _ = restore.read_variables(end_dir, expected)
  chosen = averaging.wise_ft(first, last, alphas, evaluate)
  record = chosen.record()
  record.update(
      start={'phase': start or config.phases[0].name, 'step': int(start_dir.name)},
      end={'checkpoint': end, 'step': int(end_dir.name)},
  )
  record.update(reporting.split_metrics(evaluate, chosen.variables, ['test'] * has_test))
  # A new search replaces the one before: the folder holds the chosen weights only.
  checkpoints.remove_steps_after(folder.wise_ft, -1)
  meta = {'step': int(end_dir.name), 'alpha': chosen.alpha, 'start': record['start']}
  checkpoints.save_variables(folder.wise_ft, chosen.variables, dict(meta, end=record['end']), 1)
  record['dir'] = str((folder.wise_ft / str(meta['step'])).relative_to(folder.root))
  results = json.loads(folder.results_json.read_text()) if folder.results_json.exists() else {}
  reporting.write_json(folder.results_json, dict(results, wise_ft=record))
  plots.write_interpolation(
      folder.wise_ft_png, alphas, [m['accuracy'] for m in chosen.val], chosen.alpha
  )
  logger.info(
      'WiSE-FT: alpha %g chosen on the validation split (val_accuracy %.4f)%s; weights in %s',
      chosen.alpha,
      record['val_accuracy'],
      f", test_accuracy {record['test_accuracy']:.4f}" if has_test else '',
      folder.wise_ft,
  )
  return record


def _check_config(config: ml_collections.ConfigDict) -> None:
  """An interpolation the run asks for must be possible: refused before it trains."""
  settings = config.get('wise_ft') or {}
  if not settings.get('enabled'):
    return
  names = [p.get('name') or f'phase{i}' for i, p in enumerate(config.phases)]
  start = settings.get('start')
  if len(names) < 2:
    raise ConfigError(
        'config.wise_ft.enabled needs two phases or more: it interpolates between ends of phases'
    )
  if start is not None and start not in names[:-1]:
    raise ConfigError(
        f'config.wise_ft.start={start!r}: expected the name of a phase before the last, '
        f'one of {names[:-1]}'
    )
  if (config.get('data') or {}).get('val_split', 'validation') is None:
    raise ConfigError(
        'config.wise_ft.enabled chooses alpha on the validation split, but '
        'config.data.val_split is None'
    )


registry.register_config_check('wise_ft', _check_config)
