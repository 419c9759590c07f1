"""Every optimizer fineflax builds: Keras' update rules, schedules, decay, clipping, accumulation.

The optimizer of a phase is, innermost first:

  clip_by_global_norm(clip_norm)            when clip_norm is set
  adam | sgd | rmsprop (with the schedule)  Keras' update rules and epsilons
  decoupled weight decay                    p -= lr(t) * weight_decay * p, as Keras 3 and
                                            optax.adamw apply it; never BN scale/offset
                                            unless decay_batchnorm
  optax.MultiSteps(accumulate)              outermost, when accumulate > 1

Schedules count *updates*, one per `accumulate` batches; accumulation runs on across
epoch ends (optax.MultiSteps keeps its partial sums), so a phase makes
`epochs * steps_per_epoch // accumulate` updates and epoch e starts in update
`e * steps_per_epoch // accumulate`. The optimizer sees the trainable view of the
parameters (`freeze.trainable_view`), whose frozen leaves are `optax.MaskedNode()`s, so
frozen leaves get no decay either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fineflax import config as config_lib
from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.pytree import path_str
from fineflax.train import freeze

# Keras' epsilon for Adam and RMSprop (optax defaults to 1e-8).
KERAS_EPSILON = 1e-7
# Keras' RMSprop `rho`.
KERAS_RMSPROP_RHO = 0.9
# The weight decay of 'adamw' when the phase leaves `weight_decay` at None.
ADAMW_DEFAULT_DECAY = 1e-4

OPTIMIZERS = ('adam', 'adamw', 'sgd', 'rmsprop')
SCHEDULES = ('constant', 'cosine', 'warmup_cosine', 'step')
# The parameters of a BatchNormalization layer that weight decay leaves alone.
BATCHNORM_PARAMS = ('scale', 'bias')

Phase = Any  # a phase ConfigDict (fineflax.config.phase) or a dict with the same keys


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """A phase's optimizer and, for the metrics record, its learning rate on the host.

  Attributes:
    tx: the transformation to wrap with `freeze.partition_optimizer`.
    learning_rate: `learning_rate(batches)` is the rate of the update that the next batch
      contributes to, after `batches` train batches of the phase (with accumulation, the
      update made every `accumulate` batches).
  """

  tx: optax.GradientTransformation
  learning_rate: Callable[[int], float]


def weight_decay(phase: Phase) -> float:
  """The phase's decoupled weight decay: `weight_decay`, or if None 1e-4 for adamw, else 0."""
  if phase['weight_decay'] is not None:
    return float(phase['weight_decay'])
  return ADAMW_DEFAULT_DECAY if phase['optimizer'] == 'adamw' else 0.0


def update_at_epoch(phase: Phase, steps_per_epoch: int, epoch: float) -> int:
  """The update in which the phase's `epoch` (may be fractional) begins."""
  return int(epoch * steps_per_epoch) // phase['accumulate']


def build_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the update count (see the module docstring).

  constant: `learning_rate`; cosine: from `learning_rate` to 0 over the phase's epochs;
  warmup_cosine: linear from 0 over `warmup_epochs`, then cosine to 0 at the phase's end;
  step: times `decay_factor` from each epoch in `decay_epochs` on.
  """
  lr = float(phase['learning_rate'])
  total = max(1, update_at_epoch(phase, steps_per_epoch, phase['epochs']))
  kind = phase['schedule']
  if kind == 'constant':
    return optax.constant_schedule(lr)
  if kind == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=total)
  if kind == 'warmup_cosine':
    warmup = min(update_at_epoch(phase, steps_per_epoch, phase['warmup_epochs']), total - 1)
    if warmup == 0:  # optax's warmup of 0 steps warns; it would be this cosine anyway
      return optax.cosine_decay_schedule(lr, decay_steps=total)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total)
  if kind == 'step':
    # Never at update 0: a decay epoch >= 1 that starts inside the first update (fewer
    # batches an epoch than `accumulate`) takes effect from the second.
    boundaries = {max(1, update_at_epoch(phase, steps_per_epoch, int(e))):
                  float(phase['decay_factor'])
                  for e in phase['decay_epochs']}
    return optax.piecewise_constant_schedule(lr, boundaries)
  raise ConfigError(f'schedule={kind!r}: expected one of {SCHEDULES}')


def _base_optimizer(phase: Phase, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Keras' update rule of `phase.optimizer`, the learning rate (and sign) included."""
  name = phase['optimizer']
  momentum = phase['momentum'] or None
  if name in ('adam', 'adamw'):
    # Keras Adam: beta 0.9 / 0.999, epsilon 1e-7. Keras adds epsilon to sqrt(v) before the
    # bias correction, optax after it: updates differ by < eps / sqrt(1 - 0.999^t) / |g|
    # (relative), ~3e-6 at the first step for |g| ~ 1, vanishing as t grows.
    return optax.adam(schedule, eps=KERAS_EPSILON)
  if name == 'sgd':
    # Keras keeps lr inside its momentum buffer, optax scales the trace by the current lr:
    # the same trajectory at a constant rate.
    return optax.sgd(schedule, momentum=momentum, nesterov=phase['nesterov'])
  if name == 'rmsprop':
    # Keras 3: lr * g / sqrt(velocity + epsilon), epsilon inside the square root, then
    # momentum on that increment (optax.rmsprop's order too).
    return optax.rmsprop(schedule, decay=KERAS_RMSPROP_RHO, eps=KERAS_EPSILON,
                         eps_in_sqrt=True, momentum=momentum)
  raise ConfigError(f'optimizer={name!r}: expected one of {OPTIMIZERS}')


def decays(path: str, batchnorm_layers: frozenset[str], decay_batchnorm: bool) -> bool:
  """Whether weight decay applies to the parameter at `path` ('backbone/conv1_bn/scale').

  Every parameter does, except the scale and offset of the layers in `batchnorm_layers`
  (layer paths such as 'backbone/conv1_bn') unless `decay_batchnorm`.
  """
  if decay_batchnorm:
    return True
  layer, _, name = path.rpartition('/')
  return not (name in BATCHNORM_PARAMS and layer in batchnorm_layers)


def decoupled_weight_decay(schedule: optax.Schedule, rate: float,
                           decays_path: Callable[[str], bool]) -> optax.GradientTransformation:
  """Adds `-schedule(t) * rate * p` to the update of every `p` whose path `decays_path`.

  It follows the update rule in the chain rather than feeding it, so that momentum and
  Adam's normalisation never see the decay (Keras 3 shrinks the variables before its
  update; both use the parameters before the step). Parameter trees may hold
  `optax.MaskedNode()`s (frozen leaves): they have no leaves, so get nothing.
  """

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('weight decay needs the parameters: call tx.update(grads, state, params)')
    step = -schedule(state.count) * rate

    def add(path, u, p):
      if not decays_path(path_str(path)):
        return u
      return u + (step * p).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(add, updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _scaled(schedule: optax.Schedule, multiplier: float) -> optax.Schedule:
  """`schedule` times `multiplier` (the same function at 1: the same bits as before)."""
  if multiplier == 1:
    return schedule
  return lambda count: multiplier * schedule(count)


def _update_rule(phase: Phase, schedule: optax.Schedule,
                 decays_path: Callable[[str], bool]) -> list[optax.GradientTransformation]:
  """The update rule and decoupled weight decay at `schedule`, to chain."""
  parts = [_base_optimizer(phase, schedule)]
  rate = weight_decay(phase)
  if rate > 0:
    parts.append(decoupled_weight_decay(schedule, rate, decays_path))
  return parts


def _chain(parts: list[optax.GradientTransformation]) -> optax.GradientTransformation:
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def build_optimizer(phase: Phase, steps_per_epoch: int,
                    batchnorm_layers: frozenset[str] = frozenset(),
                    groups: freeze.ParamGroups | None = None) -> Optimizer:
  """The optimizer of one phase.

  Args:
    phase: a validated phase (optimizer, learning_rate, momentum, nesterov, weight_decay,
      decay_batchnorm, schedule, warmup_epochs, decay_epochs, decay_factor, clip_norm,
      accumulate, epochs).
    steps_per_epoch: train batches per epoch; the schedule counts updates, one per
      `accumulate` batches.
    batchnorm_layers: paths of the BatchNormalization layers ('backbone/conv1_bn') whose
      'scale' and 'bias' weight decay skips unless `phase.decay_batchnorm`.
    groups: the phase's learning-rate groups (`freeze.param_groups`). With several, the
      update rule and weight decay run once per group, under `freeze.partition_groups`,
      each at the phase's schedule times the group's multiplier; clipping (global norm
      over every trainable leaf) and accumulation stay outside, shared.

  Returns:
    An `Optimizer` whose `tx` expects `tx.update(grads, state, params)`; its
    `learning_rate` is the base rate (multiplier 1), what metrics.jsonl records.
  """
  check_phase(phase)
  schedule = build_schedule(phase, steps_per_epoch)
  bn, decay_bn = frozenset(batchnorm_layers), bool(phase['decay_batchnorm'])
  decays_path = lambda p: decays(p, bn, decay_bn)
  parts = []
  if phase['clip_norm'] is not None:
    parts.append(optax.clip_by_global_norm(float(phase['clip_norm'])))
  if groups is None or not groups.discriminative:
    parts += _update_rule(phase, schedule, decays_path)  # flat: the state it always had
  else:
    # The schedule is scaled, not the gradients: Adam and RMSprop would normalise a
    # gradient scale away. Weight decay follows the scaled rate (p -= m * lr(t) * wd * p),
    # as timm's layer_decay does (its param groups' lr_scale sets each group's lr, and
    # torch's AdamW / SGD decay by that lr). big_vision's lr_mults leave decay unscaled
    # (its add_decayed_weights comes after the lr_mults, with separate wd_mults).
    parts.append(freeze.partition_groups(
        {label: _chain(_update_rule(phase, _scaled(schedule, m), decays_path))
         for label, m in groups.multipliers.items()}, groups.groups))
  tx = _chain(parts)
  accumulate = int(phase['accumulate'])
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()

  def learning_rate(batches: int) -> float:
    return float(schedule(batches // accumulate))

  return Optimizer(tx=tx, learning_rate=learning_rate)


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
    fail(f"nesterov=True needs optimizer 'sgd' with momentum > 0 (got optimizer={name!r}, "
         f'momentum={momentum})')
  if momentum and name in ('adam', 'adamw'):
    fail(f'momentum={momentum} has no effect with optimizer {name!r} (its beta_1 is 0.9); '
         "use optimizer 'sgd' or 'rmsprop', or momentum=0")
  if phase['decay_batchnorm'] and weight_decay(phase) == 0:
    fail(f'decay_batchnorm=True needs weight_decay > 0 (got weight_decay='
         f"{phase['weight_decay']} with optimizer {name!r})")
  kind, warmup = phase['schedule'], phase['warmup_epochs']
  if warmup and kind != 'warmup_cosine':
    fail(f"warmup_epochs={warmup} needs schedule 'warmup_cosine' (got {kind!r})")
  if kind == 'warmup_cosine' and warmup and warmup >= epochs:
    fail(f"schedule 'warmup_cosine' needs warmup_epochs < epochs (got warmup_epochs={warmup}, "
         f'epochs={epochs})')
  decay_epochs = tuple(phase['decay_epochs'])
  if decay_epochs and kind != 'step':
    fail(f"decay_epochs={decay_epochs} needs schedule 'step' (got {kind!r})")
  if kind == 'step':
    if not decay_epochs:
      fail("schedule 'step' needs decay_epochs, the epochs at which the rate drops")
    if not all(_is_int(e) and 0 < e < epochs for e in decay_epochs):
      fail(f'decay_epochs={decay_epochs}: each must be an int epoch within the phase, in '
           f'[1, {epochs - 1}] (epochs={epochs})')
    if len(set(decay_epochs)) != len(decay_epochs):
      fail(f'decay_epochs={decay_epochs}: an epoch appears twice')


def _check_phases(config: Any) -> None:
  for i, p in enumerate(config.phases):
    check_phase(config_lib.phase(**dict(p)), f'config.phases[{i}].')


registry.register_choices('phases.optimizer', OPTIMIZERS)
registry.register_config_check('optimizers', _check_phases)
