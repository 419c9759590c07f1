"""Opening a finished (or running) run: its model, config, classes and a checkpoint's
parameters, for evaluation and prediction.

    run = load_run('runs/demo')              # checkpoints/best, else checkpoints/latest
    run = load_run('runs/demo', 'latest')
    run = load_run('runs/demo', 12)          # step 12 of latest/ (or best/)
    run = load_run('runs/demo', weights='ema')  # the moving average (config.ema)

A run trained with LoRA adapters (config.model.lora) comes back merged: each adapted
kernel is W + (alpha / r) * A @ B and `model` is built without adapters, so every reader
(evaluate, predict, export) runs the plain model at no extra cost.

Only `params` and `batch_stats` are read: the optimizer state's tree depends on the phase
the checkpoint was saved in, and nothing here needs it. The arrays come back as float32
arrays on this process's first device, whatever mesh the run was trained on, so a run
trained on 8 GPUs opens on a laptop.

A run folder (docs/checkpoints.md) holds checkpoints/latest/<step>/ and
checkpoints/best/<step>/, the resolved config in DIR/config.json and the classes in
DIR/dataset.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from fineflax import config as config_lib, data, models, storage, weights
from fineflax.errors import ConfigError
from fineflax.models import lora
from fineflax.run import RunDir, checkpoints

logger = logging.getLogger('fineflax.run.restore')

KINDS = ('best', 'latest', 'wise_ft', 'soup')  # the checkpoints a run folder may have
WEIGHTS = ('raw', 'ema')  # a checkpoint's parameters, or their moving average (config.ema)


def check_weights_kind(kind: str) -> None:
  """ConfigError unless `kind` is one of WEIGHTS."""
  if kind not in WEIGHTS:
    raise ConfigError(f'weights {kind!r}: expected one of {", ".join(WEIGHTS)}')


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A run's model with the variables of one of its checkpoints.

  Attributes:
    model: the classifier the run's config builds (without LoRA adapters: `merged`).
    variables: {'params', 'batch_stats'} of the checkpoint (adapters merged).
    config: the run's resolved config (DIR/config.json).
    class_names: the dataset's class names (index = label).
    image_shape: the shape the dataset's images are stored at (H, W, 3).
    step: the checkpoint's train step.
    checkpoint_dir: the checkpoint's step folder.
    label: 'best', 'latest' or 'step<N>': which checkpoint was asked for (a 'best' that
      fell back to latest/ says 'latest'), with '-ema' for its moving average.
    meta: the checkpoint's meta record (phase, epoch, ...).
    weights: 'raw' (the parameters) or 'ema' (their moving average, config.ema).
  """

  model: nn.Module
  variables: dict[str, Any]
  config: ml_collections.ConfigDict
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  step: int
  checkpoint_dir: epath.Path
  label: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)
  weights: str = 'raw'


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The validated config of the run in `workdir` (its DIR/config.json).

  Raises:
    ConfigError: no such folder, or a folder that is not a fineflax run.
  """
  workdir = RunDir(workdir).root
  if not workdir.is_dir():
    raise ConfigError(f'{workdir}: no such run directory')
  path = RunDir(workdir).config_json
  if not path.is_file():
    raise ConfigError(
        f'{workdir} is not a fineflax run: it has no {path.name} '
        '(python -m fineflax.train writes one when a run starts)'
    )
  try:
    values = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path}: not valid JSON ({e})') from None
  return config_lib.from_dict(values)


def read_dataset_info(workdir: str | os.PathLike) -> data.DatasetInfo:
  """The class names and image shape the run was trained with (DIR/dataset.json, which a
  run writes before its first step).

  Raises:
    ConfigError: the folder has no dataset.json.
  """
  path = RunDir(workdir).dataset_json
  if not path.is_file():
    raise ConfigError(
        f'{workdir} is not a fineflax run: it has no {path.name} '
        '(python -m fineflax.train writes one when a run starts)'
    )
  values = json.loads(path.read_text())
  return data.DatasetInfo(
      image_shape=tuple(values['image_shape']), class_names=tuple(values['class_names'])
  )


def find_checkpoint(
    workdir: str | os.PathLike, checkpoint: str | int = 'best'
) -> tuple[epath.Path, str]:
  """The step folder of `checkpoint` in the run, and its label.

  Args:
    workdir: the run directory.
    checkpoint: 'best' (falls back to 'latest', with a warning, when the run kept no best
      checkpoint, e.g. one without a validation split; a soup's folder has only 'soup'),
      'latest', 'wise_ft' (fineflax.interpolate's), 'soup' (fineflax.soup's) or a step
      number (in latest/, else best/), as int or digits.
  Raises:
    ConfigError: the run has no checkpoint, or not the step asked for.
  """
  workdir = RunDir(workdir).root
  run_dir = RunDir(workdir)
  folders = {kind: getattr(run_dir, kind) for kind in KINDS}
  if isinstance(checkpoint, str) and checkpoint.isdigit():
    checkpoint = int(checkpoint)
  if isinstance(checkpoint, str) and checkpoint not in KINDS:
    raise ConfigError(
        f"checkpoint {checkpoint!r}: expected {', '.join(map(repr, KINDS))} or a step number"
    )
  steps = {kind: checkpoints.complete_steps(f) for kind, f in folders.items()}
  if not any(steps.values()):
    raise ConfigError(f'{run_dir.checkpoints}: no checkpoint (the run saved none yet)')
  if isinstance(checkpoint, int):
    for kind in ('latest', 'best'):
      if checkpoint in steps[kind]:
        return folders[kind] / str(checkpoint), f'step{checkpoint}'
    raise ConfigError(
        f'{run_dir.checkpoints} has no step {checkpoint} (no folder '
        f'latest/{checkpoint} or best/{checkpoint}); its steps: '
        + ', '.join(f'{kind}/ {found}' for kind, found in steps.items() if found)
    )
  if checkpoint == 'best' and not steps['best'] and not steps['latest'] and steps['soup']:
    checkpoint = 'soup'  # a soup's folder: its one set of weights
  elif checkpoint == 'best' and not steps['best']:
    logger.warning(
        '%s has no best checkpoint (no validation split?); using the latest one', workdir
    )
    checkpoint = 'latest'
  if not steps[checkpoint]:
    made_by = {'wise_ft': 'python -m fineflax.interpolate', 'soup': 'python -m fineflax.soup'}
    hint = f' ({made_by[checkpoint]} makes one)' if checkpoint in made_by else ''
    raise ConfigError(
        f'{folders[checkpoint]}: no checkpoint{hint}; the run has '
        + ', '.join(f'{kind}/' for kind, found in steps.items() if found)
    )
  return folders[checkpoint] / str(steps[checkpoint][-1]), checkpoint


def _check_fits(saved: Any, expected: Any, where: str) -> None:
  """CheckpointMismatchError unless `saved` has exactly the leaves, shapes and dtypes of
  `expected`; checkpoints.py's comparison, so that a resume and a restore word it alike."""
  specs = checkpoints.leaf_specs
  checkpoints.check_same_tree(specs(saved), specs(expected), where)


def _not_a_step(step_dir: epath.Path) -> str:
  """Why `step_dir` is no checkpoint, in one line naming the steps that do exist."""
  if step_dir.is_dir():
    return f'{step_dir}: not a checkpoint step folder (it has no state/)'
  if not step_dir.parent.is_dir():
    return f'{step_dir}: no such checkpoint folder ({step_dir.parent} does not exist)'
  steps = checkpoints.complete_steps(step_dir.parent)
  return f'{step_dir}: no such checkpoint folder; the steps in {step_dir.parent}: ' + (
      ', '.join(map(str, steps)) if steps else 'none'
  )


def read_variables(
    step_dir: str | os.PathLike, expected: dict[str, Any], weights_kind: str = 'raw'
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The params and batch_stats of a checkpoint step folder, and its meta record.

  Args:
    step_dir: a `checkpoints/{best,latest}/<step>` folder.
    expected: the abstract {'params', 'batch_stats'} the checkpoint must hold.
    weights_kind: 'raw', or 'ema' for the moving average's parameters in their place.
  Raises:
    ConfigError: no such step folder (naming the steps beside it), or one without `state`.
    CheckpointMismatchError: the checkpoint holds other leaves or shapes (naming them).
  """
  step_dir = storage.absolute(step_dir, 'checkpoint folder')
  if not (step_dir / 'state').is_dir():
    raise ConfigError(_not_a_step(step_dir))
  handler = ocp.PyTreeCheckpointHandler()  # (a Checkpointer would warn: see weights.files)
  try:
    saved = handler.metadata(step_dir / 'state')
  finally:
    handler.close()
  saved = getattr(saved, 'tree', saved)
  # The optimizer state and step are left out on both sides: only these two are compared.
  wanted = {k: v for k, v in expected.items() if v}
  _check_fits({k: saved.get(k, {}) for k in wanted}, wanted, str(step_dir))
  check_weights_kind(weights_kind)
  variables = weights.read_variable_tree(step_dir / 'state', ema=weights_kind == 'ema')
  meta = step_dir / 'meta' / 'metadata'
  return variables, json.loads(meta.read_text()) if meta.is_file() else {}


def init_from_folder(path: str | os.PathLike) -> epath.Path:
  """The folder of a parameter tree to start from (`config.init_from`): a run's best
  checkpoint (else its latest; a soup's folder: the soup), a checkpoint step folder, or a
  converted checkpoint; a local path or gs://."""
  path = storage.as_path(
      os.path.expanduser(path) if storage.is_local(path) else path, 'config.init_from'
  )
  for folder in (RunDir(path).best, RunDir(path).latest, RunDir(path).soup):
    steps = checkpoints.complete_steps(folder)
    if steps:
      path = folder / str(steps[-1])
      break
  if (path / 'state').is_dir():
    return path / 'state'
  if not path.is_dir():
    raise ConfigError(f'config.init_from={str(path)!r}: no such run, checkpoint or folder')
  return path


def init_from_variables(path: epath.Path, ema: bool = False) -> dict[str, Any]:
  """{'params', 'batch_stats'} of an `init_from_folder` folder, LoRA adapters merged: a
  run with adapters hands on the weights its merged model uses (the scale from the run's
  config.json); ConfigError where factors come without a run to read the scale from."""
  variables = weights.read_variable_tree(path, ema=ema)
  if not lora.has_adapters(variables['params']):
    return variables
  # <run>/checkpoints/<kind>/<step>/state
  root = next((p for p in path.parents if (p / 'config.json').is_file()), None)
  spec = None if root is None else lora.spec_from_config(read_config(root).model.get('lora'))
  if spec is None:
    raise ConfigError(
        f'config.init_from={str(path)!r} holds LoRA factors but no run config.json above it '
        'gives their scale: point config.init_from at the run folder'
    )
  return {**variables, 'params': lora.merge(variables['params'], spec.scale)}


def load_run(
    workdir: str | os.PathLike, checkpoint: str | int = 'best', weights: str = 'raw'
) -> RestoredRun:
  """The model of the run in `workdir` with a checkpoint's params and batch_stats.

  Args:
    workdir: a directory `python -m fineflax.train` wrote.
    checkpoint: 'best', 'latest' or a step number (see `find_checkpoint`).
    weights: 'raw' (the parameters) or 'ema' (the moving average the checkpoint
      holds, with config.ema).
  Raises:
    ConfigError: no such directory, not a run, no such checkpoint; its subclass
      CheckpointMismatchError when the checkpoint does not fit the model of the config.
  """
  workdir = RunDir(workdir).root
  config = read_config(workdir)
  step_dir, label = find_checkpoint(workdir, checkpoint)
  info = read_dataset_info(workdir)
  model = models.from_config(config, info.class_names)
  variables, meta = read_variables(
      step_dir, models.abstract_variables(model, info.image_shape), weights
  )
  model, variables = merged(model, variables)
  logger.info('restored %s (step %s, %s, %s weights)', step_dir, step_dir.name, label, weights)
  return RestoredRun(
      model=model,
      variables=variables,
      config=config,
      class_names=info.class_names,
      image_shape=info.image_shape,
      step=int(step_dir.name),
      checkpoint_dir=step_dir,
      label=label + ('-ema' if weights == 'ema' else ''),
      meta=meta,
      weights=weights,
  )


def merged(model: nn.Module, variables: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
  """The model without its LoRA adapters, and `variables` with each adapter folded into
  its kernel (W + (alpha / r) * A @ B): the same logits, as plain variables. A model
  without adapters comes back as it is."""
  spec = getattr(model, 'lora', None)
  if spec is None:
    return model, variables
  params = lora.merge(variables['params'], spec.scale)
  return model.clone(lora=None), {**variables, 'params': params}
