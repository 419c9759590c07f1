"""A phase's optimizer, assembled in one place: the freeze labels, learning-rate groups,
schedule, update rule, weight decay, clipping and accumulation.

`make_optimizer(model, params, phase, steps_per_epoch)` builds, innermost first:

  the update rule (`update_rules`: Keras' adam | sgd | rmsprop) at the schedule
    (`schedules`), then decoupled weight decay    p -= lr(t) * weight_decay * p, as
                                                  Keras 3 and optax.adamw apply it; never
                                                  BN scale/offset unless decay_batchnorm
  optax.multi_transform over learning-rate groups one rule per multiplier, at the
                                                  schedule times it (lr_groups, layer_decay)
  clip_by_global_norm(clip_norm)                  when clip_norm is set
  optax.MultiSteps(accumulate)                    when accumulate > 1
  optax.multi_transform over the freeze labels    {'trainable': the above, 'frozen':
                                                  set_to_zero()}

Frozen leaves are kept out of the update entirely: the step differentiates and updates
the *trainable view* of the parameters (`Optimizer.trainable`), a copy of the tree whose
frozen leaves are `optax.MaskedNode()`s (pytree nodes with no leaves), and the optimizer
is initialised on that view too, so frozen leaves get no gradient, no optimizer state and
no update, not even an added zero, and stay bit-for-bit equal.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import optax

from fineflax import config as config_lib, models
from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.models.graph import Layer
from fineflax.pytree import path_str
from fineflax.train import freeze, schedules, update_rules
from fineflax.train.freeze import FROZEN, TRAINABLE, Labels, Params

Phase = Any  # a phase ConfigDict (fineflax.config.phase) or a dict with the same keys


# ---------------------------------------------------------------------------------------
# Learning-rate groups (`phases[i].lr_groups`, `phases[i].layer_decay`)
# ---------------------------------------------------------------------------------------


def group_label(multiplier: float) -> str:
  """The label of the group trained at `multiplier` x the phase's rate: TRAINABLE at 1.
  Checkpoint keys hold no '.' or '-': 0.5 -> 'trainable_x0p5'."""
  if multiplier == 1:
    return TRAINABLE
  return 'trainable_x' + repr(float(multiplier)).replace('.', 'p').replace('-', 'm')


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """A phase's labelling of the parameters.

  Attributes:
    labels: TRAINABLE / FROZEN at every leaf (what the step differentiates); a leaf
      frozen by the spec or at multiplier 0 is FROZEN.
    groups: `group_label(m)` at every trainable leaf, FROZEN at the others: the labels of
      the learning-rate groups' `optax.multi_transform`.
    multipliers: group label -> multiplier, the non-zero groups in descending order.
  """

  labels: Labels
  groups: Labels
  multipliers: dict[str, float]

  @property
  def discriminative(self) -> bool:
    """Whether the phase trains at more than one rate."""
    return set(self.multipliers) != {TRAINABLE}


def lr_group_error(item: Any) -> str | None:
  """What is wrong with one (spec, multiplier) pair of `lr_groups`, or None."""
  if not isinstance(item, (tuple, list)) or len(item) != 2:
    return f"expected a (spec, multiplier) pair such as ('layers[:143]', 0.1), got {item!r}"
  spec, multiplier = item
  if spec == 'none':
    return "spec 'none' matches nothing; leave the pair out"
  if spec != 'head':
    try:
      freeze.check_syntax(spec)
    except freeze.FreezeSpecError as e:
      return str(e).replace('freeze spec', 'spec') + " (or 'head')"
  if (
      not isinstance(multiplier, (int, float))
      or isinstance(multiplier, bool)
      or not math.isfinite(multiplier)
      or multiplier < 0
  ):
    return (
        f'multiplier {multiplier!r} must be a number >= 0 (0 freezes, as the freeze ' 'spec does)'
    )
  return None


def param_groups(
    params: Params,
    spec: str,
    backbone_layers: Sequence[Layer],
    lr_groups: Sequence[Sequence[Any]] = (),
    layer_decay: float | None = None,
    stages: freeze.Stages | None = None,
) -> ParamGroups:
  """The groups of a phase: the freeze spec, then `lr_groups` x `layer_decay`.

  A leaf's multiplier is the multiplier of the first `lr_groups` pair whose spec matches
  it (1 if none does) times `layer_decay ** k`, `k` the stages between its layer and the
  head: 0 in the head, 1 in the backbone's last stage, len(stages) in its first (the
  stem). The freeze spec wins over both: a frozen leaf stays frozen whatever its
  multiplier; a multiplier of 0 freezes exactly as the spec does.

  Raises:
    FreezeSpecError: the freeze spec does not fit (see `freeze.freeze_labels`), a pair
      indexes beyond the backbone or matches no parameter that an earlier pair left, or
      the multipliers leave nothing to train.
  """
  frozen = freeze.freeze_labels(params, spec, backbone_layers, stages)
  matchers: list[Callable[[str], bool]] = []
  for j, (pair_spec, _) in enumerate(lr_groups):
    if pair_spec == 'head':
      matchers.append(lambda path: path.startswith('head/'))
      continue
    try:
      matchers.append(freeze.spec_predicate(pair_spec, backbone_layers, stages))
    except freeze.FreezeSpecError as e:
      raise freeze.FreezeSpecError(
          f'lr_groups[{j}]: {str(e).replace("freeze spec", "spec")}'
      ) from None
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
      raise freeze.FreezeSpecError(
          f'lr_groups[{j}]: spec {lr_groups[j][0]!r} matches no '
          'parameter that an earlier pair left'
      )
  groups = jax.tree.map(
      lambda f, m: FROZEN if f == FROZEN or m == 0 else group_label(m), frozen, mults
  )
  if all(g == FROZEN for g in jax.tree.leaves(groups)):
    raise freeze.FreezeSpecError(
        'lr_groups: with the freeze spec, multipliers of 0 freeze '
        'every parameter: nothing would train'
    )
  values = {
      group_label(m): m
      for f, m in zip(jax.tree.leaves(frozen), jax.tree.leaves(mults))
      if f == TRAINABLE and m != 0
  }
  labels = jax.tree.map(lambda g: FROZEN if g == FROZEN else TRAINABLE, groups)
  return ParamGroups(labels, groups, dict(sorted(values.items(), key=lambda kv: -kv[1])))


def phase_groups(model: models.Classifier, params: Params, phase: Phase, index: int) -> ParamGroups:
  """The groups of `config.phases[index]` over the model's `params` (shapes will do);
  a spec that does not fit the model is a ConfigError naming the phase."""
  try:
    return param_groups(
        params,
        phase['freeze'],
        model.backbone.layers,
        phase.get('lr_groups') or (),
        phase.get('layer_decay'),
        model.layer_stages(),
    )
  except freeze.FreezeSpecError as e:
    # Errors of lr_groups start with their key ('lr_groups[1]: ...'), the spec's do not.
    key = 'freeze: ' if str(e).startswith('freeze spec') else ''
    raise ConfigError(f'config.phases[{index}].{key}{e}') from None


def group_sizes(params: Params, groups: Labels) -> dict[str, int]:
  """Parameters per group label (FROZEN included)."""
  out: dict[str, int] = {}
  for g, p in zip(jax.tree.leaves(groups), jax.tree.leaves(params)):
    out[g] = out.get(g, 0) + math.prod(p.shape)
  return out


def describe_groups(groups: ParamGroups, params: Params) -> str:
  """'x1: 5,130, x0.5: 378,112, ..., frozen: 4,832 params': the groups' sizes."""
  sizes = group_sizes(params, groups.groups)
  parts = [f'x{m:g}: {sizes[label]:,}' for label, m in groups.multipliers.items()]
  return ', '.join(parts + [f'frozen: {sizes.get(FROZEN, 0):,}']) + ' params'


# ---------------------------------------------------------------------------------------
# The trainable view and the partition
# ---------------------------------------------------------------------------------------


def trainable_view(params: Params, labels: Labels) -> Params:
  """`params` with every frozen leaf replaced by `optax.MaskedNode()` (no leaf at all)."""
  return jax.tree.map(
      lambda label, p: p if label == TRAINABLE else optax.MaskedNode(), labels, params
  )


def merge(labels: Labels, trainable: Params, params: Params) -> Params:
  """Puts the leaves of a trainable view back into the full tree `params`."""
  return jax.tree.map(lambda label, t, p: t if label == TRAINABLE else p, labels, trainable, params)


def partition(
    txs: Mapping[str, optax.GradientTransformation], labels: Labels
) -> optax.GradientTransformation:
  """`optax.multi_transform` of one transformation per label, FROZEN doing nothing.

  Used on trainable views, whose frozen leaves hold only MaskedNodes: the FROZEN entry
  has nothing to do, and each state covers its own trainable leaves only.
  """
  return optax.multi_transform({**txs, FROZEN: optax.set_to_zero()}, labels)


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A phase's optimizer over the trainable view of the parameters.

  Attributes:
    tx: the transformation; `tx.update(grads, state, params)` on trainable views.
    learning_rate: `learning_rate(batches)` is the base rate (multiplier 1) of the update
      that the next batch contributes to, after `batches` train batches of the phase (with
      accumulation, the update made every `accumulate` batches): what metrics.jsonl records.
    groups: the phase's labels and learning-rate groups; None: every leaf trains at the
      base rate, and views are the parameters themselves.
  """

  tx: optax.GradientTransformation
  learning_rate: Callable[[int], float]
  groups: ParamGroups | None = None

  @property
  def labels(self) -> Labels | None:
    """TRAINABLE / FROZEN at every leaf (None: all trainable)."""
    return None if self.groups is None else self.groups.labels

  def trainable(self, params: Params) -> Params:
    """The trainable view of `params` (or of a gradient tree of the same shape)."""
    return params if self.groups is None else trainable_view(params, self.groups.labels)

  def frozen(self, params: Params) -> Params:
    """The frozen view of `params`: the complement of `trainable`."""
    if self.groups is None:
      return jax.tree.map(lambda _: optax.MaskedNode(), params)
    return jax.tree.map(
        lambda label, p: p if label == FROZEN else optax.MaskedNode(), self.groups.labels, params
    )

  def merge(self, trainable: Params, params: Params) -> Params:
    """The whole tree: the trainable view's leaves, the others from `params` (the whole
    tree or its frozen view)."""
    return trainable if self.groups is None else merge(self.groups.labels, trainable, params)

  def init(self, params: Params) -> Any:
    """The optimizer state of `params`: over their trainable leaves only."""
    return self.tx.init(self.trainable(params))


def build_optimizer(
    phase: Phase,
    steps_per_epoch: int,
    groups: ParamGroups | None = None,
    batchnorm_layers: frozenset[str] = frozenset(),
) -> Optimizer:
  """The optimizer of one phase (the module docstring's chain).

  Args:
    phase: a validated phase (optimizer, learning_rate, momentum, nesterov, weight_decay,
      decay_batchnorm, schedule, warmup_epochs, decay_epochs, decay_factor, clip_norm,
      accumulate, epochs).
    steps_per_epoch: train batches per epoch; the schedule counts updates, one per
      `accumulate` batches.
    groups: the phase's labels and learning-rate groups (`param_groups`); None: the
      chain without the two partitions, on whole parameter trees.
    batchnorm_layers: paths of the BatchNormalization layers ('backbone/conv1_bn') whose
      'scale' and 'bias' weight decay skips unless `phase.decay_batchnorm`.
  """
  check_phase(phase)
  schedule = schedules.build_schedule(phase, steps_per_epoch)
  bn, decay_bn = frozenset(batchnorm_layers), bool(phase['decay_batchnorm'])
  decays_path = lambda p: update_rules.decays(p, bn, decay_bn)
  if groups is None or not groups.discriminative:
    tx = update_rules.update_rule(phase, schedule, decays_path)
  else:
    # The schedule is scaled, not the gradients: Adam and RMSprop would normalise a
    # gradient scale away. Weight decay follows the scaled rate (p -= m * lr(t) * wd * p),
    # as timm's layer_decay does (its param groups' lr_scale sets each group's lr, and
    # torch's AdamW / SGD decay by that lr). big_vision's lr_mults leave decay unscaled
    # (its add_decayed_weights comes after the lr_mults, with separate wd_mults).
    tx = partition(
        {
            label: update_rules.update_rule(phase, schedules.scaled(schedule, m), decays_path)
            for label, m in groups.multipliers.items()
        },
        groups.groups,
    )
  if phase['clip_norm'] is not None:
    # Over every trainable leaf, whatever its group.
    tx = optax.chain(optax.clip_by_global_norm(float(phase['clip_norm'])), tx)
  accumulate = int(phase['accumulate'])
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
  if groups is not None:
    tx = partition({TRAINABLE: tx}, groups.labels)

  def learning_rate(batches: int) -> float:
    return float(schedule(batches // accumulate))

  return Optimizer(tx=tx, learning_rate=learning_rate, groups=groups)


def make_optimizer(
    model: models.Classifier, params: Params, phase: Phase, steps_per_epoch: int, index: int = 0
) -> Optimizer:
  """The optimizer of `config.phases[index]` (`phase`) for `model`, whose parameters
  (shapes will do) are `params`."""
  batchnorm = frozenset(
      f'{group}/{layer.name}'
      for group, layers in model.layer_groups().items()
      for layer in layers
      if layer.kind == 'BatchNormalization'
  )
  return build_optimizer(
      phase, steps_per_epoch, phase_groups(model, params, phase, index), batchnorm
  )


# ---------------------------------------------------------------------------------------
# Checks of the optimizer keys, before anything runs
# ---------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_phase(phase: Phase, prefix: str = '') -> None:
  """Rejects optimizer keys of a phase that contradict each other or the phase.

  Args:
    phase: the phase, its values already type-checked.
    prefix: put before the key each message starts with ('config.phases[1].').

  Raises:
    ConfigError: naming the offending key relative to the phase (after `prefix`).
  """

  def fail(message: str) -> None:
    raise ConfigError(prefix + message)

  name, momentum, epochs = phase['optimizer'], phase['momentum'], phase['epochs']
  if phase['nesterov'] and not (name == 'sgd' and momentum > 0):
    fail(
        f"nesterov=True needs optimizer 'sgd' with momentum > 0 (got optimizer={name!r}, "
        f'momentum={momentum})'
    )
  if momentum and name in ('adam', 'adamw'):
    fail(
        f'momentum={momentum} has no effect with optimizer {name!r} (its beta_1 is 0.9); '
        "use optimizer 'sgd' or 'rmsprop', or momentum=0"
    )
  if phase['decay_batchnorm'] and update_rules.weight_decay(phase) == 0:
    fail(
        f'decay_batchnorm=True needs weight_decay > 0 (got weight_decay='
        f"{phase['weight_decay']} with optimizer {name!r})"
    )
  kind, warmup = phase['schedule'], phase['warmup_epochs']
  if warmup and kind != 'warmup_cosine':
    fail(f"warmup_epochs={warmup} needs schedule 'warmup_cosine' (got {kind!r})")
  if kind == 'warmup_cosine' and warmup and warmup >= epochs:
    fail(
        f"schedule 'warmup_cosine' needs warmup_epochs < epochs (got warmup_epochs={warmup}, "
        f'epochs={epochs})'
    )
  decay_epochs = tuple(phase['decay_epochs'])
  if decay_epochs and kind != 'step':
    fail(f"decay_epochs={decay_epochs} needs schedule 'step' (got {kind!r})")
  if kind == 'step':
    if not decay_epochs:
      fail("schedule 'step' needs decay_epochs, the epochs at which the rate drops")
    if not all(_is_int(e) and 0 < e < epochs for e in decay_epochs):
      fail(
          f'decay_epochs={decay_epochs}: each must be an int epoch within the phase, in '
          f'[1, {epochs - 1}] (epochs={epochs})'
      )
    if len(set(decay_epochs)) != len(decay_epochs):
      fail(f'decay_epochs={decay_epochs}: an epoch appears twice')


def _check_phases(config: Any) -> None:
  for i, p in enumerate(config.phases):
    check_phase(config_lib.phase(**dict(p)), f'config.phases[{i}].')
    for j, item in enumerate(p.get('lr_groups') or ()):
      error = lr_group_error(item)
      if error:
        raise ConfigError(f'config.phases[{i}].lr_groups[{j}]: {error}')


registry.register_config_check('optimizers', _check_phases)
