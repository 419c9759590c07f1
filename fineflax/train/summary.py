"""Keras-style model summary: `python -m fineflax.summary --config configs/x.py [--phase N]`.

One row per Keras layer (backbone, then head) with its output shape, parameter count and
whether it trains in the chosen phase, then the totals counted as Keras counts them:
BatchNormalization moving statistics are non-trainable, even inside trainable layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fineflax import config as config_lib, data, models
from fineflax.errors import ConfigError
from fineflax.models import Classifier, abstract_variables
from fineflax.train import freeze, optimizers


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  kind: str
  output_shape: tuple[Any, ...]
  params: int
  trainable: str  # 'Y', 'N', 'partly', or '-' for a layer without parameters
  multiplier: str = ''  # x learning_rate of its trainable parameters ('0.5', 'mixed', '-')


@dataclasses.dataclass(frozen=True)
class Summary:
  rows: tuple[Row, ...]
  trainable: int
  non_trainable: int
  groups: str = ''  # the learning-rate groups and their sizes; '' without lr_groups/layer_decay

  @property
  def total(self) -> int:
    return self.trainable + self.non_trainable


def _size(tree: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _multiplier(layer_groups: Any, multipliers: dict[str, float]) -> str:
  values = {multipliers[g] for g in jax.tree.leaves(layer_groups) if g != freeze.FROZEN}
  return '-' if not values else f'{values.pop():g}' if len(values) == 1 else 'mixed'


def summarize(
    model: Classifier,
    image_shape: tuple[int, int, int],
    freeze_spec: str,
    groups: optimizers.ParamGroups | None = None,
) -> Summary:
  """The summary of `model` on images of `image_shape` with `freeze_spec` applied, or
  with a phase's `groups` (`optimizers.phase_groups`), which add a learning-rate column.

  Only shapes are computed (`jax.eval_shape`): summarising ResNet152 costs no FLOPs.
  """
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
  variables = abstract_variables(model, image_shape)
  _, captured = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), variables, images
  )
  params, stats = variables['params'], variables['batch_stats']
  labels = (
      groups.labels
      if groups is not None
      else freeze.freeze_labels(params, freeze_spec, model.backbone.layers, model.layer_stages())
  )
  shown = groups is not None and groups.discriminative
  rows, trainable = [], 0
  for group, layers in model.layer_groups().items():
    outputs = captured['intermediates'][group]['layer_outputs']
    for layer, output in zip(layers, outputs, strict=True):
      layer_params = params[group].get(layer.name, {})
      layer_labels = labels[group].get(layer.name, {})
      n_trainable = sum(
          _size(p)
          for p, label in zip(jax.tree.leaves(layer_params), jax.tree.leaves(layer_labels))
          if label == freeze.TRAINABLE
      )
      n_params = _size(layer_params)
      n_all = n_params + _size(stats.get(group, {}).get(layer.name, {}))
      flag = (
          '-'
          if n_params == 0
          else 'Y'
          if n_trainable == n_params
          else 'N'
          if n_trainable == 0
          else 'partly'
      )
      mult = (
          _multiplier(groups.groups[group].get(layer.name, {}), groups.multipliers) if shown else ''
      )
      rows.append(Row(layer.name, layer.kind, (None,) + tuple(output.shape[1:]), n_all, flag, mult))
      trainable += n_trainable
  described = optimizers.describe_groups(groups, params) if shown else ''
  return Summary(tuple(rows), trainable, _size(params) + _size(stats) - trainable, described)


def format_summary(summary: Summary, title: str) -> str:
  """The table and the three Keras total lines."""
  header = ('Layer (type)', 'Output Shape', 'Param #', 'Trainable')
  cells = [
      (f'{r.name} ({r.kind})', str(r.output_shape), f'{r.params:,}', r.trainable)
      for r in summary.rows
  ]
  if summary.groups:  # discriminative learning rates: each layer's multiplier
    header += ('LR x',)
    cells = [c + (r.multiplier,) for c, r in zip(cells, summary.rows)]
  widths = [max(len(c[i]) for c in cells + [header]) for i in range(len(header))]

  def line(c):
    return '  '.join(
        [c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].rjust(widths[2])]
        + [x.center(w) for x, w in zip(c[3:], widths[3:])]
    )

  rule = '-' * len(line(header))
  out = [f'Model: "{title}"', rule, line(header), rule] + [line(c) for c in cells] + [rule]
  out += [
      f'Total params: {summary.total:,}',
      f'Trainable params: {summary.trainable:,}',
      f'Non-trainable params: {summary.non_trainable:,}',
  ]
  if summary.groups:
    out.append(f'Learning-rate groups (x learning_rate): {summary.groups}')
  return '\n'.join(out)


def summarize_config(config: ml_collections.ConfigDict, phase: int = 0) -> tuple[Summary, str]:
  """The summary of `config`'s model with the freeze spec of phase `phase`, and a title."""
  config = config_lib.validate(config)
  if not -len(config.phases) <= phase < len(config.phases):
    raise ConfigError(f'--phase {phase}: the config has {len(config.phases)} phases')
  class_names, shape = _model_inputs(config)
  model = models.from_config(config, class_names)
  p = config.phases[phase]
  title = f'{config.model.backbone} + head, phase {p.name!r} (freeze {p.freeze!r})'
  params = abstract_variables(model, shape)['params']
  groups = optimizers.phase_groups(model, params, p, phase % len(config.phases))
  return summarize(model, shape, p.freeze, groups), title


def _model_inputs(
    config: ml_collections.ConfigDict,
) -> tuple[tuple[str, ...], tuple[int, int, int]]:
  """Class names and the input image shape the model is built for: from the config when
  it sets both the class count and the image size (no dataset needed: the photo folder
  or tfds dataset may not be on this machine yet), else from the dataset."""
  model = config.model
  size = model.image_size
  if model.include_top and size is None:
    size = models.BACKBONES[model.backbone].input_size  # the top's ImageNet input
  count = (
      model.num_classes if model.num_classes is not None else (1000 if model.include_top else None)
  )
  if count is not None and size is not None:
    names = tuple(f'class{i}' for i in range(2 if count == 1 else count))  # 1: binary
    return names, (size, size, 3)
  info = data.dataset_info(config.data)
  return info.class_names, (size, size, 3) if model.include_top else info.image_shape
