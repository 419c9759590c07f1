"""Putting a weight file's layers into the model's variables, with a report.

The backbone must be loaded whole, shape for shape (a mismatch is an error naming the
parameter); the head is loaded where the file has a matching layer (a 1000-class top into
an `include_top` model) and initialised otherwise; file layers the model has no place
for (the top, when the model has a new head) are skipped. Every load says which.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Mapping, Sequence

import jax
import numpy as np

from fineflax.models import lora
from fineflax.models.graph import Layer
from fineflax.pytree import path_str
from fineflax.weights import vit_files
from fineflax.weights.files import PARAMETER_NAMES, FileLayers, WeightFileError, keras_arrays

WEIGHTED_KINDS = (
    'Conv2D',
    'SeparableConv2D',
    'DepthwiseConv2D',
    'BatchNormalization',
    'LayerNormalization',
    'LayerScale',
    'Dense',
    'ClassToken',
    'PositionEmbedding',
    'MultiHeadAttention',
)


def has_weights(layer: Layer) -> bool:
  """Whether Keras saves weights for `layer` (a Sequential: when one of its layers has)."""
  if layer.kind == 'Sequential':
    return any(has_weights(sub) for sub in layer.sublayers)
  if layer.kind == 'Normalization':  # EfficientNet's: mean, variance and count
    return layer.stored_statistics
  return layer.kind in WEIGHTED_KINDS


def weight_count(layer: Layer) -> int:
  """How many arrays Keras saves for `layer`."""
  if layer.kind == 'Sequential':
    return sum(weight_count(sub) for sub in layer.sublayers)
  counts = {'BatchNormalization': 4, 'Dense': 2} | {k: len(v) for k, v in PARAMETER_NAMES.items()}
  if layer.kind == 'Normalization':
    return 3 if layer.stored_statistics else 0
  if layer.kind in counts:
    return counts[layer.kind]
  if layer.kind in WEIGHTED_KINDS:  # convolutions: kernel(s), then the bias if any
    return (2 if layer.kind == 'SeparableConv2D' else 1) + int(layer.use_bias)
  return 0


@dataclasses.dataclass
class LoadReport:
  """What a load did, layer by layer ('backbone/conv1_conv', ...)."""

  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  initialised: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)  # 'name: why'
  adapted: list[str] = dataclasses.field(default_factory=list)  # 'name: how' (loaded, changed)
  num_loaded: int = 0  # parameters and statistics, counted as Keras counts them

  def text(self) -> str:
    """A few lines for the log."""
    lines = [
        f'weights {self.source}: loaded {len(self.loaded)} layers ' f'({self.num_loaded:,} values)'
    ]
    if self.initialised:
      lines.append(f'  initialised (not in the file): {", ".join(self.initialised)}')
    if self.skipped:
      lines.append(f'  skipped (in the file, not loaded): {"; ".join(self.skipped)}')
    if self.adapted:
      lines.append(f'  adapted to this model: {"; ".join(self.adapted)}')
    return '\n'.join(lines)


def layer_variables(layer: Layer, arrays: Sequence[np.ndarray]) -> dict[str, dict[str, Any]]:
  """Keras' weights of one layer -> {'params': {...}, 'batch_stats': {...}} of fineflax (a
  Sequential's nested under its layers' names)."""
  a = list(arrays)
  if layer.kind == 'Sequential':
    if len(a) != weight_count(layer):
      raise WeightFileError(
          f'{layer.name}: expected {weight_count(layer)} arrays for its layers '
          f'{[sub.name for sub in layer.sublayers]}, got {len(a)}'
      )
    out: dict[str, dict[str, Any]] = {}
    for sub in (sub for sub in layer.sublayers if has_weights(sub)):
      n = weight_count(sub)
      for collection, leaves in layer_variables(sub, a[:n]).items():
        out.setdefault(collection, {})[sub.name] = leaves
      a = a[n:]
    return out
  if layer.kind == 'BatchNormalization':
    if len(a) != 4:
      raise WeightFileError(
          f'{layer.name}: expected gamma, beta, mean and variance, got ' f'{len(a)} arrays'
      )
    return {'params': {'scale': a[0], 'bias': a[1]}, 'batch_stats': {'mean': a[2], 'var': a[3]}}
  if layer.kind == 'Normalization':
    if len(a) != 3:
      raise WeightFileError(f'{layer.name}: expected mean, variance and count, got {len(a)} arrays')
    return {'batch_stats': {'mean': a[0], 'var': a[1], 'count': a[2]}}
  if layer.kind in PARAMETER_NAMES:
    names = PARAMETER_NAMES[layer.kind]
    if len(a) != len(names):
      raise WeightFileError(f'{layer.name}: expected {len(names)} arrays, got {len(a)}')
    return {'params': dict(zip(names, a))}
  if layer.kind == 'SeparableConv2D':
    # Keras' depthwise kernel is (k, k, C, 1); a grouped convolution wants (k, k, 1, C).
    params = {'depthwise_kernel': a[0].transpose(0, 1, 3, 2), 'pointwise_kernel': a[1]}
    rest = a[2:]
  elif layer.kind == 'DepthwiseConv2D':
    params, rest = {'kernel': a[0].transpose(0, 1, 3, 2)}, a[1:]
  else:  # Conv2D (grouped too: Keras' and Flax's kernels are both (k, k, C / groups, F))
    params, rest = {'kernel': a[0]}, a[1:]
  if rest:
    params['bias'] = rest[0]
  return {'params': params}


_NEW_HEAD = 'the model has a new head (config.model.include_top is False)'


def _pairs_by_order(
    weighted: Mapping[str, list[Layer]],
    file_layers: FileLayers,
    source: str,
    head_is_top: bool,
    report: LoadReport,
) -> list:
  backbone = weighted['backbone']
  if len(file_layers) < len(backbone):
    raise WeightFileError(
        f'{source} has {len(file_layers)} layers with weights but the '
        f'backbone has {len(backbone)}: it is not a file of this backbone'
    )
  pairs = [('backbone', layer, item) for layer, item in zip(backbone, file_layers)]
  rest = file_layers[len(backbone) :]
  if rest and len(rest) != len(weighted['head']) and head_is_top:
    raise WeightFileError(
        f'{source} has {len(rest)} layers with weights after the backbone '
        f'but Keras\' top has {len(weighted["head"])}: it is not a file of '
        'this backbone'
    )
  if head_is_top:
    # By order, like the backbone: the tops of older Keras files have other names
    # (keras_applications' ResNets call theirs `probs`).
    pairs += [('head', layer, item) for layer, item in zip(weighted['head'], rest)]
  else:
    report.skipped += [f'{name}: {_NEW_HEAD}' for name, _ in rest]
  return pairs


def _pairs_by_name(
    weighted: Mapping[str, list[Layer]],
    file_layers: FileLayers,
    source: str,
    head_is_top: bool,
    report: LoadReport,
    top_names: Collection[str] = ('predictions',),
) -> list:
  by_name = dict(file_layers)
  missing = [layer.name for layer in weighted['backbone'] if layer.name not in by_name]
  if missing:
    raise WeightFileError(
        f'{source} lacks {len(missing)} backbone layers, e.g. {missing[:3]}: '
        'it is not a file of this backbone'
    )
  pairs = [
      ('backbone', layer, (layer.name, by_name.pop(layer.name))) for layer in weighted['backbone']
  ]
  if head_is_top:
    pairs += [
        ('head', layer, (layer.name, by_name.pop(layer.name)))
        for layer in weighted['head']
        if layer.name in by_name
    ]
  extra = [name for name in by_name if name not in top_names]
  if extra:
    raise WeightFileError(
        f'{source} has {len(extra)} layers this backbone lacks, e.g. '
        f'{extra[:3]}: it is a file of another backbone'
    )
  report.skipped += [f'{name}: {_NEW_HEAD}' for name in by_name]
  return pairs


def assign(
    variables: dict[str, Any],
    layer_groups: Mapping[str, Sequence[Layer]],
    file_layers: FileLayers,
    *,
    by_order: bool,
    source: str,
    head_is_top: bool,
    unused_keys: Sequence[str] = (),
    top_names: Collection[str] = ('predictions',),
) -> tuple[dict[str, Any], LoadReport]:
  """Returns `variables` with the file's values in place, and the report.

  Args:
    head_is_top: the model's head is Keras' ImageNet top (`include_top`); a file's top
      is loaded into it, and skipped otherwise.
    top_names: the layers of Keras' top with weights: a file matched by name may hold them
      beyond the backbone (skipped under a new head); any other extra layer is an error.
  Raises:
    WeightFileError: the file does not hold this backbone (or holds a larger one), or a
      backbone parameter's shape differs (named in the message).
  """
  report = LoadReport(source)
  report.skipped += [f'{key}: not a parameter of this model' for key in unused_keys]
  weighted = {
      g: [layer for layer in layers if has_weights(layer)] for g, layers in layer_groups.items()
  }
  if by_order:
    pairs = _pairs_by_order(weighted, file_layers, source, head_is_top, report)
  else:
    pairs = _pairs_by_name(weighted, file_layers, source, head_is_top, report, top_names)
  out = {c: {g: dict(tree) for g, tree in groups.items()} for c, groups in variables.items()}
  loaded = set()
  for group, layer, (file_name, arrays) in pairs:
    problem = _count_problem(variables, group, layer, arrays)
    new = {} if problem else layer_variables(layer, arrays)
    if layer.kind == 'PositionEmbedding' and not problem:
      new = _resized_position_embedding(variables, group, layer.name, new, report)
    problem = problem or _shape_problem(variables, group, layer.name, new)
    if problem and group == 'backbone':
      raise WeightFileError(f'{source}: {problem} (file layer {file_name!r})')
    if problem:
      report.skipped.append(f'{file_name}: {problem}')
      continue
    for collection, leaves in new.items():
      current = variables[collection][group][layer.name]
      out[collection][group][layer.name] = _with_factors(_as_dtypes(leaves, current), current)
      report.num_loaded += sum(int(np.size(v)) for v in _flat(leaves).values())
    loaded.add((group, layer.name))
    report.loaded.append(f'{group}/{layer.name}')
  report.initialised = [
      f'{g}/{layer.name}'
      for g, layers in weighted.items()
      for layer in layers
      if (g, layer.name) not in loaded
  ]
  return out, report


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b': leaf} of a nested dict (a Sequential's layers nest their parameters)."""
  return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(dict(tree))[0]}


def _as_dtypes(leaves: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
  """`leaves` as numpy arrays of the dtypes of the model's `current` leaves, same nesting."""
  return {
      k: _as_dtypes(v, current[k]) if isinstance(v, Mapping) else np.asarray(v, current[k].dtype)
      for k, v in leaves.items()
  }


def _with_factors(new: dict[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
  """`new` with the LoRA factors of `current` kept: weight files hold none."""
  out = dict(new)
  for k, v in current.items():
    if k in (lora.A, lora.B):
      out[k] = v
    elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
      out[k] = _with_factors(out[k], v)
  return out


def _count_problem(
    variables: dict[str, Any], group: str, layer: Layer, arrays: Sequence[np.ndarray]
) -> str | None:
  """What is wrong when the file's layer has another number of arrays than `layer` takes."""
  if len(arrays) == weight_count(layer):
    return None
  own = lambda collection: variables.get(collection, {}).get(group, {}).get(layer.name, {})
  expected = [tuple(a.shape) for a in keras_arrays(layer, own('params'), own('batch_stats'))]
  return (
      f'{group}/{layer.name}: the file has {len(arrays)} arrays of shapes '
      f'{[tuple(np.shape(a)) for a in arrays]}, the model expects {len(expected)} of shapes '
      f'{expected}'
  )


def _resized_position_embedding(
    variables: dict[str, Any],
    group: str,
    name: str,
    new: dict[str, dict[str, Any]],
    report: LoadReport,
) -> dict[str, dict[str, Any]]:
  """A ViT's position embedding for the model's grid of patches when the file's is
  another (weights of 224 px fine-tuned at 384, or CIFAR at 64): resized as torchvision
  resizes it, and said in the report."""
  have = new['params']['embedding']
  want = variables['params'][group][name]['embedding'].shape
  if have.shape == tuple(want) or have.shape[::2] != tuple(want)[::2]:
    return new  # the same, or another width: _shape_problem names it
  old, size = math.isqrt(have.shape[1] - 1), math.isqrt(want[1] - 1)
  report.adapted.append(
      f'{group}/{name}: resized from a {old}x{old} to a {size}x{size} grid of patches '
      "(bicubic, corners aligned: torchvision's interpolate_embeddings)"
  )
  return {'params': {'embedding': vit_files.resize_position_embedding(have, want[1])}}


def _shape_problem(
    variables: dict[str, Any], group: str, name: str, new: dict[str, dict[str, Any]]
) -> str | None:
  for collection, leaves in new.items():
    expected = variables.get(collection, {}).get(group, {}).get(name)
    want, have = _flat(expected or {}), _flat(leaves)
    want = {k: v for k, v in want.items() if not lora.is_factor(k)}
    if expected is None or set(want) != set(have):
      return (
          f'{group}/{name}: the file has {sorted(have)} for {collection}, the model {sorted(want)}'
      )
    wrong = [
        f'{collection} {group}/{name}/{key}: the file has shape '
        f'{tuple(np.shape(value))}, the model expects {tuple(want[key].shape)}'
        for key, value in have.items()
        if tuple(np.shape(value)) != tuple(want[key].shape)
    ]
    if wrong:
      return '; '.join(wrong)
  return None
