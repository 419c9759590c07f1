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

Discriminative fine-tuning (`phases[i].lr_groups`, `phases[i].layer_decay`) refines the
trainable label into groups, one per distinct learning-rate multiplier (`param_groups`);
a multiplier of 0 is the FROZEN label itself, so it freezes exactly as the spec does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

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


# ---------------------------------------------------------------------------------------
# Discriminative fine-tuning: a learning-rate multiplier per parameter.
# ---------------------------------------------------------------------------------------


def group_label(multiplier: float) -> str:
  """The label of the group trained at `multiplier` x the phase's rate; 1 keeps TRAINABLE,
  so that a phase without groups has the optimizer state it always had (old checkpoints
  resume). Checkpoint keys hold no '.' or '-': 0.5 -> 'trainable_x0p5'."""
  if multiplier == 1:
    return TRAINABLE
  return 'trainable_x' + repr(float(multiplier)).replace('.', 'p').replace('-', 'm')


def lr_group_error(item: Any) -> str | None:
  """What is wrong with one (spec, multiplier) pair of `lr_groups`, or None."""
  if not isinstance(item, (tuple, list)) or len(item) != 2:
    return f"expected a (spec, multiplier) pair such as ('layers[:143]', 0.1), got {item!r}"
  spec, multiplier = item
  if spec == 'none':
    return "spec 'none' matches nothing; leave the pair out"
  if spec != 'head':
    try:
      check_syntax(spec)
    except FreezeSpecError as e:
      return str(e).replace('freeze spec', 'spec') + " (or 'head')"
  if (not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool)
      or not math.isfinite(multiplier) or multiplier < 0):
    return (f'multiplier {multiplier!r} must be a number >= 0 (0 freezes, as the freeze '
            'spec does)')
  return None


def _check_lr_groups(config: Any) -> None:
  for i, phase in enumerate(config.phases):
    for j, item in enumerate(phase.get('lr_groups') or ()):
      error = lr_group_error(item)
      if error:
        raise ConfigError(f'config.phases[{i}].lr_groups[{j}]: {error}')


registry.register_config_check('lr_groups', _check_lr_groups)


def _matcher(spec: str, backbone_layers: Sequence[Layer]) -> Callable[[str], bool]:
  if spec == 'head':
    return lambda path: path.startswith('head/')
  return _frozen_predicate(spec, backbone_layers)


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """A phase's labelling of the parameters.

  Attributes:
    labels: TRAINABLE / FROZEN at every leaf (what the step differentiates); a leaf
      frozen by the spec or at multiplier 0 is FROZEN.
    groups: `group_label(m)` at every trainable leaf, FROZEN at the others: the labels of
      the `optax.multi_transform` inside the optimizer.
    multipliers: group label -> multiplier, the non-zero groups in descending order.
  """

  labels: Labels
  groups: Labels
  multipliers: dict[str, float]

  @property
  def discriminative(self) -> bool:
    """Whether the phase trains at more than one rate (else the optimizer is the plain one)."""
    return set(self.multipliers) != {TRAINABLE}


def param_groups(params: Params, spec: str, backbone_layers: Sequence[Layer],
                 lr_groups: Sequence[Sequence[Any]] = (), layer_decay: float | None = None,
                 stages: Mapping[str, tuple[int, str]] | None = None) -> ParamGroups:
  """The groups of a phase: the freeze spec, then `lr_groups` x `layer_decay`.

  A leaf's multiplier is the multiplier of the first `lr_groups` pair whose spec matches
  it (1 if none does) times `layer_decay ** k`, `k` the stages between its layer and the
  head: 0 in the head, 1 in the backbone's last stage, len(stages) in its first (the
  stem). The freeze spec wins over both: a frozen leaf stays frozen whatever its
  multiplier; a multiplier of 0 freezes exactly as the spec does.

  Raises:
    FreezeSpecError: the freeze spec does not fit (see `freeze_labels`), a pair indexes
      beyond the backbone or matches no parameter that an earlier pair left, or the
      multipliers leave nothing to train.
  """
  frozen = freeze_labels(params, spec, backbone_layers)
  matchers = []
  for j, (pair_spec, _) in enumerate(lr_groups):
    try:
      matchers.append(_matcher(pair_spec, backbone_layers))
    except FreezeSpecError as e:
      raise FreezeSpecError(f'lr_groups[{j}]: {str(e).replace("freeze spec", "spec")}') from None
  used = [False] * len(matchers)
  n_stages = 1 + max((index for index, _ in (stages or {}).values()), default=0)

  def multiplier(path: str) -> float:
    m = 1.0
    for j, match in enumerate(matchers):
      if match(path):
        used[j], m = True, float(lr_groups[j][1])
        break
    if layer_decay is not None and path.startswith('backbone/'):
      index, _ = (stages or {}).get(path.split('/')[1], (0, ''))
      m *= float(layer_decay) ** (n_stages - index)
    return m

  mults = jax.tree_util.tree_map_with_path(lambda path, _: multiplier(path_str(path)), params)
  for j, hit in enumerate(used):
    if not hit:
      raise FreezeSpecError(f'lr_groups[{j}]: spec {lr_groups[j][0]!r} matches no parameter '
                            'that an earlier pair left')
  groups = jax.tree.map(lambda f, m: FROZEN if f == FROZEN or m == 0 else group_label(m),
                        frozen, mults)
  if all(g == FROZEN for g in jax.tree.leaves(groups)):
    raise FreezeSpecError('lr_groups: with the freeze spec, multipliers of 0 freeze every '
                          'parameter: nothing would train')
  values = {group_label(m): m for f, m in zip(jax.tree.leaves(frozen), jax.tree.leaves(mults))
            if f == TRAINABLE and m != 0}
  labels = jax.tree.map(lambda g: FROZEN if g == FROZEN else TRAINABLE, groups)
  return ParamGroups(labels, groups, dict(sorted(values.items(), key=lambda kv: -kv[1])))


def partition_groups(txs: Mapping[str, optax.GradientTransformation],
                     groups: Labels) -> optax.GradientTransformation:
  """`optax.multi_transform` of one transformation per group (FROZEN: nothing to do).

  Used inside `partition_optimizer`'s trainable transform, where frozen leaves are
  already MaskedNodes: the state holds one entry per trainable group.
  """
  return optax.multi_transform({**txs, FROZEN: optax.set_to_zero()}, groups)


def group_sizes(params: Params, groups: Labels) -> dict[str, int]:
  """Parameters per group label (FROZEN included)."""
  out: dict[str, int] = {}
  for g, p in zip(jax.tree.leaves(groups), jax.tree.leaves(params)):
    out[g] = out.get(g, 0) + math.prod(p.shape)
  return out
