"""Freeze specs -> label trees: what a phase freezes, TRAINABLE or FROZEN at every leaf.

A spec says what is frozen:

  'none'           nothing
  'backbone'       every backbone parameter (Keras `base_model.trainable = False`)
  'layers[:143]'   a Python slice of the backbone's Keras layer list
                   (`for layer in base_model.layers[:143]: layer.trainable = False`)
  'stages[:-1]'    a Python slice of the backbone's stages (ResNet: stem, conv2 .. conv5;
                   VGG16: block1 .. block5; Xception: entry, middle, exit): every stage
                   but the last, whichever the backbone
  'regex:PATTERN'  every parameter whose path ('backbone/conv1_conv/kernel',
                   'head/dense/bias') `re.search`-matches PATTERN

or, for the parameter-efficient modes, what trains (all the rest is frozen), joined by '+':

  'bias'           BitFit: every additive bias (convolutions', dense layers' and the
                   normalisation layers' offsets)
  'norm'           the scale and offset of every normalisation layer (BatchNorm statistics
                   stay frozen, as `batchnorm='frozen'` keeps them)
  'head'           the new head
  'lora'           the LoRA adapters' factors (config.model.lora)
  e.g. 'norm+head', 'bias+head', 'lora+norm+head'

With LoRA adapters (parameters named 'lora_a' / 'lora_b' beside a layer's kernel), the
backbone's base weights never train but under 'bias' or 'norm': a spec of what trains
trains the parts it names ('lora+head' is classic LoRA); any other spec freezes what it
selects, adapters included ('backbone': the head alone; 'layers[:143]': the adapters of
those layers too), and every base weight of the backbone besides, so that 'none' trains
the adapters and the head.

What the labels do to the optimizer (frozen leaves get no gradient, no state and no
update) is `fineflax.train.optimizers`' job.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.models import lora
from fineflax.models.graph import Layer
from fineflax.pytree import path_str

TRAINABLE = 'trainable'
FROZEN = 'frozen'
_SLICE = re.compile(r'^(layers|stages)\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]$')

Params = Any  # a nested dict of arrays
Labels = Any  # the same nesting, with TRAINABLE / FROZEN leaves
Stages = Mapping[str, tuple[int, str]]  # layer name -> (stage index, stage name)


class FreezeSpecError(ConfigError):
  """A freeze spec that is malformed or does not fit the model."""


TRAINS_ONLY = ('bias', 'norm', 'head', 'lora')  # the parts a parameter-efficient spec trains
_BIASES = ('bias', 'in_bias', 'out_bias')  # the additive biases' leaf names
_KERNELS = ('kernel', 'depthwise_kernel', 'pointwise_kernel', 'in_kernel', 'out_kernel')


def trains_only(spec: str) -> tuple[str, ...] | None:
  """The parts of a parameter-efficient spec ('norm+head' -> ('norm', 'head')), or None."""
  parts = tuple(spec.split('+')) if isinstance(spec, str) else ()
  if parts and all(p in TRAINS_ONLY for p in parts) and len(set(parts)) == len(parts):
    return parts
  return None


def check_syntax(spec: str) -> None:
  """Raises FreezeSpecError when `spec` is not one of the accepted forms."""
  if not isinstance(spec, str):
    raise FreezeSpecError(f'freeze spec must be a string, got {spec!r}')
  if spec in ('none', 'backbone') or _SLICE.match(spec) or trains_only(spec):
    return
  if spec.startswith('regex:'):
    try:
      re.compile(spec[len('regex:') :])
    except re.error as e:
      raise FreezeSpecError(f'freeze spec {spec!r}: bad regular expression: {e}') from None
    return
  raise FreezeSpecError(
      f"freeze spec {spec!r}: expected 'none', 'backbone', 'layers[A:B]', "
      "'stages[A:B]', 'regex:PATTERN', or what trains: 'bias', 'norm', 'head', 'lora' "
      "joined by '+'"
  )


def _syntax_error(spec: str) -> str | None:
  try:
    check_syntax(spec)
  except FreezeSpecError as e:
    return str(e)
  return None


registry.register_check('phases.freeze', _syntax_error)


def _slice_bounds(
    spec: str, bounds: Sequence[str], n: int, what: str, first: str, last: str
) -> slice:
  """The slice of a 'layers[A:B]' or 'stages[A:B]' spec over `n` items, checked."""
  values = [int(b) if b else None for b in bounds]
  for b in values:
    if b is not None and not -n <= b <= n:
      hint = (
          "; 'stages[:-1]' (every stage but the last) fits any backbone" if what == 'layers' else ''
      )
      raise FreezeSpecError(
          f'freeze spec {spec!r}: index {b} is beyond the backbone, which '
          f'has {n} {what} ({what}[0] = {first!r}, {what}[{n - 1}] = '
          f'{last!r}){hint}'
      )
  return slice(*values)


def spec_predicate(
    spec: str, backbone_layers: Sequence[Layer], stages: Stages | None = None
) -> Callable[[str], bool]:
  """A function of a parameter path ('backbone/conv1_conv/kernel') that says whether
  `spec` selects it. `stages`: each backbone layer's stage (`Classifier.layer_stages`),
  needed by 'stages[A:B]'."""
  check_syntax(spec)
  if trains_only(spec):
    raise FreezeSpecError(
        f'{spec!r} says what trains: a freeze spec of its own, not a part of another spec'
    )
  if spec == 'none':
    return lambda path: False
  if spec == 'backbone':
    return lambda path: path.startswith('backbone/')
  match = _SLICE.match(spec)
  if match and match.group(1) == 'layers':
    n = len(backbone_layers)
    cut = _slice_bounds(
        spec, match.groups()[1:], n, 'layers', backbone_layers[0].name, backbone_layers[-1].name
    )
    names = {layer.name for layer in backbone_layers[cut]}
  elif match:
    order = sorted({index_name for index_name in (stages or {}).values()})
    if not order:
      raise FreezeSpecError(f'freeze spec {spec!r}: the backbone has no stages')
    cut = _slice_bounds(spec, match.groups()[1:], len(order), 'stages', order[0][1], order[-1][1])
    chosen = set(order[cut])
    names = {layer for layer, stage in stages.items() if stage in chosen}
  else:
    pattern = re.compile(spec[len('regex:') :])
    return lambda path: pattern.search(path) is not None
  return lambda path: path.split('/')[0] == 'backbone' and path.split('/')[1] in names


def _frozen_but(params: Params, parts: Sequence[str]) -> Callable[[str], bool]:
  """Whether a path is frozen under a parameter-efficient spec of `parts`. A
  normalisation layer is one with a scale and no kernel (BatchNorm, LayerNorm)."""
  trained = set()
  for group, layers in params.items():
    for name, layer in layers.items():
      # A layer's leaves by their path in it (a Sequential's layers nest theirs).
      leaves = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(layer)[0]]
      names = {leaf.split('/')[-1] for leaf in leaves}
      is_norm = 'scale' in names and not names & set(_KERNELS)
      for leaf in leaves:
        last = leaf.split('/')[-1]
        if (
            ('head' in parts and group == 'head')
            or ('bias' in parts and last in _BIASES)
            or ('norm' in parts and is_norm and last in ('scale', 'bias'))
            or ('lora' in parts and last in (lora.A, lora.B))
        ):
          trained.add(f'{group}/{name}/{leaf}')
  return lambda path: path not in trained


def freeze_labels(
    params: Params, spec: str, backbone_layers: Sequence[Layer], stages: Stages | None = None
) -> Labels:
  """The label tree of `spec` over `params` (TRAINABLE or FROZEN at every leaf).

  Raises:
    FreezeSpecError: the spec is malformed, indexes beyond the backbone, freezes nothing
      (unless it is 'none') or freezes everything.
  """
  parts = trains_only(spec)
  adapters = lora.has_adapters(params)
  if parts and 'lora' in parts and not adapters:
    raise FreezeSpecError(
        f"freeze spec {spec!r}: 'lora' trains LoRA adapters, but the model has none "
        '(config.model.lora.rank is 0)'
    )
  is_frozen = _frozen_but(params, parts) if parts else spec_predicate(spec, backbone_layers, stages)
  if adapters and not parts:
    selected = is_frozen
    is_frozen = lambda path: selected(path) or (
        path.startswith('backbone/') and not lora.is_factor(path)
    )
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if is_frozen(path_str(path)) else TRAINABLE, params
  )
  values = jax.tree.leaves(labels)
  if spec != 'none' and FROZEN not in values:
    raise FreezeSpecError(
        f'freeze spec {spec!r} matches no parameter, so nothing would be '
        "frozen; use 'none' to train everything"
    )
  if TRAINABLE not in values:
    raise FreezeSpecError(f'freeze spec {spec!r} freezes every parameter: nothing would train')
  return labels


def bn_train_layers(labels: Labels, layer_groups: Mapping[str, Sequence[Layer]]) -> frozenset[str]:
  """Paths of the BatchNormalization layers whose scale and offset are trainable.

  With training-mode BN these normalise with batch statistics and update their moving
  averages; BN layers in frozen layers stay in inference mode, as Keras runs a
  BatchNormalization layer with `trainable = False`.
  """
  out = set()
  for group, layers in layer_groups.items():
    for layer in layers:
      if layer.kind == 'BatchNormalization' and labels[group][layer.name]['scale'] == TRAINABLE:
        out.add(f'{group}/{layer.name}')
  return frozenset(out)


def stochastic_depth_layers(
    labels: Labels | None, layer_groups: Mapping[str, Sequence[Layer]]
) -> frozenset[str]:
  """Paths of the StochasticDepth layers, and of EfficientNet's per-example Dropout
  layers, that drop residual branches in training: those whose branch trains (the last
  layer with parameters they read, ConvNeXt's layer scale, EfficientNet's `project_bn`, a
  ViT's attention or MLP output, has a trainable parameter; `labels` None: everything
  trains).

  A frozen block runs as in inference, as BatchNormalization in frozen layers does: its
  output stays what cached features hold, and a branch nothing can adapt to is not dropped.
  """
  out = set()
  for group, layers in layer_groups.items():
    by_name = {layer.name: layer for layer in layers}
    for layer in layers:
      if layer.kind != 'StochasticDepth' and not layer.per_example:
        continue
      # The branch's last layer with parameters (a ViT's branch ends in a Dropout).
      source = by_name.get(layer.inputs[0])
      while source is not None and labels is not None and source.name not in labels[group]:
        source = by_name.get(source.inputs[0]) if source.inputs else None
      if labels is None:
        trains = True
      else:
        trains = source is not None and TRAINABLE in jax.tree.leaves(labels[group][source.name])
      if trains:
        out.add(f'{group}/{layer.name}')
  return frozenset(out)
