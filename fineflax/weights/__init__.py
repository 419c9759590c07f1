"""Pretrained weights: named sources, the offline-first cache, and loading into a model.

variables, report = load_pretrained(config.model, model, variables)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.models import BACKBONES, Classifier
from fineflax.weights.assign import LoadReport, assign, has_weights
from fineflax.weights.download import ChecksumError, WeightsUnavailableError, cache_dir, fetch
from fineflax.weights.files import (
    SUFFIXES,
    WeightFileError,
    read_variable_tree,
    read_weight_file,
    variable_tree_layers,
)
from fineflax.weights.sources import SOURCES, Source, WeightFile, named_source, names_for


def is_path(weights: str) -> bool:
  """Whether `config.model.weights` names a file or a converted checkpoint directory
  (a weight-file suffix, or a '/' in it: './ckpt') rather than a source."""
  return weights.endswith(SUFFIXES) or '/' in weights


TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')


def check_spec(weights: str | None, backbone: str) -> None:
  """Raises ConfigError unless `weights` is None, a file path, or a source of `backbone`."""
  if weights is None or is_path(weights):
    return
  if named_source(weights, backbone) is None:
    known = names_for(backbone)
    raise ConfigError(
        f'config.model.weights={weights!r}: no such weights for backbone {backbone!r}; '
        + (f'known: {known}' if known else 'it has no named weights')
        + f', or the path of a {"/".join(SUFFIXES)} file'
    )


def resolve(weights: str, backbone: str, include_top: bool) -> Path:
  """The local file of `config.model.weights`: the path itself, or a cached download."""
  if is_path(weights):
    path = Path(weights).expanduser()
    if not path.exists():
      raise WeightFileError(f'config.model.weights={weights!r}: no such file or directory')
    if path.suffix in TORCH_SUFFIXES and not backbone.endswith('_torchvision'):
      # Keras' layout shares torchvision's layer names for several families but not its
      # padding or strides: the file would load, and the network would compute otherwise.
      raise WeightFileError(
          f'config.model.weights={weights!r}: a torch file loads into a backbone of '
          f"torchvision's layout (a name ending in _torchvision), not {backbone!r}"
      )
    return path
  check_spec(weights, backbone)
  return fetch(named_source(weights, backbone).file(include_top))


def load_pretrained(
    model_config: Any, model: Classifier, variables: dict[str, Any], path: Path | None = None
) -> tuple[dict[str, Any], LoadReport]:
  """`variables` with `config.model.weights` loaded into them, and what was done.

  Args:
    path: the file, when the caller resolved it already (see `resolve`).
  """
  include_top = bool(model_config.get('include_top', False))
  if path is None:
    path = resolve(model_config.weights, model_config.backbone, include_top)
  groups = model.layer_groups()
  layers, unused, by_order = read_weight_file(path, groups)
  top = BACKBONES[model_config.backbone].top(1)
  return assign(
      variables,
      groups,
      layers,
      by_order=by_order,
      source=str(path),
      head_is_top=include_top,
      unused_keys=unused,
      top_names=[layer.name for layer in top if has_weights(layer)],
  )


def load_variables(
    tree: dict[str, Any], model: Classifier, variables: dict[str, Any], source: str
) -> tuple[dict[str, Any], LoadReport]:
  """`variables` with the layers of a tree of fineflax variables (`read_variable_tree`:
  another run's, for `config.init_from`) in place, and what was done.

  Layers are matched by name; a head layer of another shape (a new number of classes) is
  initialised and reported, a backbone of another kind is an error.
  """
  groups = model.layer_groups()
  layers, unused = variable_tree_layers(tree, groups, source)
  return assign(
      variables, groups, layers, by_order=False, source=source, head_is_top=True, unused_keys=unused
  )


registry.register_config_check(
    'weights', lambda config: check_spec(config.model.get('weights'), config.model.backbone)
)

__all__ = [
    'ChecksumError',
    'LoadReport',
    'SOURCES',
    'Source',
    'WeightFile',
    'WeightFileError',
    'WeightsUnavailableError',
    'assign',
    'cache_dir',
    'check_spec',
    'fetch',
    'load_pretrained',
    'load_variables',
    'named_source',
    'names_for',
    'read_variable_tree',
    'read_weight_file',
    'resolve',
]
