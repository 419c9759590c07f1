"""Freeze plans: a freeze spec -> a label tree -> `optax.multi_transform`.

A spec says what is frozen:

  'none'           nothing
  'backbone'       every backbone parameter (Keras `base_model.trainable = False`)
  'layers[:143]'   a Python slice of the backbone's Keras layer list
                   (`for layer in base_model.layers[:143]: layer.trainable = False`)
  'regex:PATTERN'  every parameter whose path ('backbone/conv1_conv/kernel',
                   'head/dense/bias') `re.search`-matches PATTERN

Frozen leaves are kept out of the update entirely: the step differentiates and updates
`trainable_view(params, labels)` only, a copy of the tree whose frozen leaves are
`optax.MaskedNode()`s (pytree nodes with no leaves). The optimizer built by
`partition_optimizer` is initialised on that view too, so frozen leaves get no gradient,
no optimizer state and no update, not even an added zero, and stay bit-for-bit equal.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import jax
import optax

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.models.graph import Layer
from fineflax.pytree import path_str

TRAINABLE = 'trainable'
FROZEN = 'frozen'
_SLICE = re.compile(r'^layers\[\s*(-?\d*)\s*:\s*(-?\d*)\s*\]$')

Params = Any  # a nested dict of arrays
Labels = Any  # the same nesting, with TRAINABLE / FROZEN leaves


class FreezeSpecError(ConfigError):
  """A freeze spec that is malformed or does not fit the model."""


def check_syntax(spec: str) -> None:
  """Raises FreezeSpecError when `spec` is not one of the accepted forms."""
  if not isinstance(spec, str):
    raise FreezeSpecError(f'freeze spec must be a string, got {spec!r}')
  if spec in ('none', 'backbone') or _SLICE.match(spec):
    return
  if spec.startswith('regex:'):
    try:
      re.compile(spec[len('regex:'):])
    except re.error as e:
      raise FreezeSpecError(f'freeze spec {spec!r}: bad regular expression: {e}') from None
    return
  raise FreezeSpecError(
      f"freeze spec {spec!r}: expected 'none', 'backbone', 'layers[A:B]' or 'regex:PATTERN'")



def _syntax_error(spec: str) -> str | None:
  try:
    check_syntax(spec)
  except FreezeSpecError as e:
    return str(e)
  return None


registry.register_check('phases.freeze', _syntax_error)

def _frozen_predicate(spec: str, backbone_layers: Sequence[Layer]):
  """A function of a parameter path that says whether `spec` freezes it."""
  check_syntax(spec)
  if spec == 'none':
    return lambda path: False
  if spec == 'backbone':
    return lambda path: path.startswith('backbone/')
  match = _SLICE.match(spec)
  if match:
    n = len(backbone_layers)
    bounds = [int(b) if b else None for b in match.groups()]
    for b in bounds:
      if b is not None and not -n <= b <= n:
        raise FreezeSpecError(
            f'freeze spec {spec!r}: index {b} is beyond the backbone, which has {n} layers '
            f'(layers[0] = {backbone_layers[0].name!r}, layers[{n - 1}] = '
            f'{backbone_layers[-1].name!r})')
    names = {layer.name for layer in backbone_layers[slice(*bounds)]}
    return lambda path: path.split('/')[0] == 'backbone' and path.split('/')[1] in names
  pattern = re.compile(spec[len('regex:'):])
  return lambda path: pattern.search(path) is not None


def freeze_labels(params: Params, spec: str, backbone_layers: Sequence[Layer]) -> Labels:
  """The label tree of `spec` over `params` (TRAINABLE or FROZEN at every leaf).

  Raises:
    FreezeSpecError: the spec is malformed, indexes beyond the backbone, freezes nothing
      (unless it is 'none') or freezes everything.
  """
  is_frozen = _frozen_predicate(spec, backbone_layers)
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if is_frozen(path_str(path)) else TRAINABLE, params)
  values = jax.tree.leaves(labels)
  if spec != 'none' and FROZEN not in values:
    raise FreezeSpecError(f'freeze spec {spec!r} matches no parameter, so nothing would be '
                          "frozen; use 'none' to train everything")
  if TRAINABLE not in values:
    raise FreezeSpecError(f'freeze spec {spec!r} freezes every parameter: nothing would train')
  return labels


def trainable_view(params: Params, labels: Labels) -> Params:
  """`params` with every frozen leaf replaced by `optax.MaskedNode()` (no leaf at all)."""
  return jax.tree.map(lambda label, p: p if label == TRAINABLE else optax.MaskedNode(),
                      labels, params)


def merge(labels: Labels, trainable: Params, params: Params) -> Params:
  """Puts the leaves of a trainable view back into the full tree `params`."""
  return jax.tree.map(lambda label, t, p: t if label == TRAINABLE else p,
                      labels, trainable, params)


def partition_optimizer(tx: optax.GradientTransformation,
                        labels: Labels) -> optax.GradientTransformation:
  """`optax.multi_transform` of `tx` over the trainable group.

  Use it on `trainable_view`s: there the frozen group holds only MaskedNodes, so its
  transform has nothing to do, and the trainable group's state covers trainable leaves only.
  """
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


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
