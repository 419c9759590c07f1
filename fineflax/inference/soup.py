"""Model soups (Wortsman et al. 2022): the average of the weights of several runs of one
model, uniform or greedy, or of the last checkpoints of one run (timm's
avg_checkpoints.py). The result is a run folder of its own, which evaluate, predict,
load_run and init_from open like a trained run's (its weights: checkpoints/soup/0/).

The runs must share the model: the backbone, the head, the classes and the image size
(each run's config.json and dataset.json), and so the same parameter tree; the first
difference is named. The soup is measured on the first run's validation and test splits;
greedy soups choose on the validation split only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax

from fineflax.errors import ConfigError
from fineflax.inference.run_splits import RunSplits, open_run_splits
from fineflax.run import RunDir, checkpoints, reporting, restore
from fineflax.train import averaging

# What two runs must agree on to be averaged: (what, how to read it from a run).
_SAME_MODEL = (
    ('backbone', lambda c, i: c.model.backbone),
    ('head', lambda c, i: c.model.head.to_dict()),
    ('image size', lambda c, i: c.model.image_size),
    ('class list', lambda c, i: list(i.class_names)),
    ('stored image shape', lambda c, i: list(i.image_shape)),
)


def check_same_model(runs: Sequence[str | os.PathLike]) -> None:
  """ConfigError naming the first run and the first thing that differs from the first
  run's model."""
  first = runs[0]
  ref_config, ref_info = restore.read_config(first), restore.read_dataset_info(first)
  for run in runs[1:]:
    config, info = restore.read_config(run), restore.read_dataset_info(run)
    for what, read in _SAME_MODEL:
      if read(config, info) != read(ref_config, ref_info):
        raise ConfigError(
            f'{run} cannot be averaged with {first}: another {what} '
            f'({read(config, info)!r}, not {read(ref_config, ref_info)!r})'
        )


def ingredients_of(
    runs: Sequence[str | os.PathLike], checkpoint: str, last: int | None, expected: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
  """(name, variables) of each run's `checkpoint`, or of the last `last` checkpoints of
  one run's latest/."""
  if last is not None:
    if len(runs) != 1:
      raise ConfigError(f'--last {last} averages the checkpoints of one run; got {len(runs)}')
    folder = RunDir(runs[0]).latest
    steps = checkpoints.complete_steps(folder)
    if last < 1 or last > len(steps):
      raise ConfigError(
          f'--last {last}: {folder} keeps {len(steps)} checkpoints ({steps}); '
          'config.checkpoint.keep sets how many'
      )
    dirs = [(f'{runs[0]}:step{s}', folder / str(s)) for s in steps[-last:]]
  else:
    dirs = []
    for run in runs:
      step_dir, label = restore.find_checkpoint(run, checkpoint)
      dirs.append((f'{run}:{label} (step {step_dir.name})', step_dir))
  out = []
  for name, step_dir in dirs:
    variables, _ = restore.read_variables(step_dir, expected)
    out.append((name, jax.device_get(variables)))
  return out


def _check_out(out: RunDir, overwrite: bool) -> None:
  if out.root.exists() and any(out.root.iterdir()) and not overwrite:
    raise ConfigError(f'--out {out.root}: the folder exists and is not empty; pass --overwrite')


def _metrics(splits: RunSplits, variables: dict[str, Any]) -> dict[str, Any]:
  roles = [role for role in ('val', 'test') if splits.has(role)]
  return reporting.split_metrics(splits.evaluate, variables, roles)


def soup_runs(
    out: str | os.PathLike,
    runs: Sequence[str | os.PathLike],
    *,
    greedy: bool = False,
    last: int | None = None,
    checkpoint: str = 'best',
    overwrite: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
  """Averages `runs` (their `checkpoint`), or the last `last` checkpoints of one run, into
  the run folder `out`; `greedy`: Wortsman et al.'s greedy soup. Returns the report that
  `out`/results.json holds under 'soup'.

  Raises:
    ConfigError: no run given, runs of different models (naming the first difference),
      a greedy soup without a validation split, an `out` that exists.
  """
  if not runs:
    raise ConfigError('no run to average: give one run folder or more')
  folder = RunDir(out)
  _check_out(folder, overwrite)
  runs = [RunDir(r).root for r in runs]
  check_same_model(runs)
  splits = open_run_splits(runs[0], devices=devices)
  ingredients = ingredients_of(runs, checkpoint, last, splits.abstract)
  for name, variables in ingredients[1:]:
    difference = averaging.first_difference(ingredients[0][1], variables)
    if difference:
      raise ConfigError(f'{name} cannot be averaged with {ingredients[0][0]}: {difference}')
  if greedy:
    if not splits.has('val'):
      raise ConfigError(f'{runs[0]}: a greedy soup chooses on the validation split; it has none')
    individual = [splits.evaluate(v, 'val') for _, v in ingredients]
    soup = averaging.greedy_soup(ingredients, individual, splits.evaluate)
  else:
    soup = averaging.Soup(
        tuple(n for n, _ in ingredients), averaging.average([v for _, v in ingredients]), None
    )
  report = {
      'method': 'greedy' if greedy else 'uniform',
      'ingredients': [n for n, _ in ingredients],
      'kept': list(soup.kept),
      'tried': list(soup.tried),
      **_metrics(splits, soup.variables),
  }
  if folder.root.exists():
    checkpoints.remove_steps_after(folder.soup, -1)
  folder.root.mkdir(parents=True, exist_ok=True)
  # The first run's model and classes: what evaluate, predict and load_run rebuild.
  first = RunDir(runs[0])
  for source, target in (
      (first.config_json, folder.config_json),
      (first.dataset_json, folder.dataset_json),
  ):
    reporting.write_json(target, json.loads(source.read_text()))
  checkpoints.save_variables(folder.soup, soup.variables, {'step': 0, 'soup': report}, 1)
  reporting.write_json(folder.results_json, {'soup': report})
  return report
