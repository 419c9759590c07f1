"""Keras' update rules as optax transformations: `phases[i].optimizer`, and the decoupled
weight decay that follows the rule.

Each rule takes the learning rate as an optax schedule of the update count and includes
its sign, so the chain's output is the update to add to the parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fineflax.config import registry
from fineflax.pytree import path_str

# Keras' epsilon for Adam and RMSprop (optax defaults to 1e-8).
KERAS_EPSILON = 1e-7
# Keras' RMSprop `rho`.
KERAS_RMSPROP_RHO = 0.9
# The weight decay of 'adamw' when the phase leaves `weight_decay` at None.
ADAMW_DEFAULT_DECAY = 1e-4

OPTIMIZERS = ('adam', 'adamw', 'sgd', 'rmsprop')
# The parameters of a BatchNormalization layer that weight decay leaves alone.
BATCHNORM_PARAMS = ('scale', 'bias')

Phase = Any  # a phase ConfigDict (fineflax.config.phase) or a dict with the same keys


def weight_decay(phase: Phase) -> float:
  """The phase's decoupled weight decay: `weight_decay`, or if None 1e-4 for adamw, else 0."""
  if phase['weight_decay'] is not None:
    return float(phase['weight_decay'])
  return ADAMW_DEFAULT_DECAY if phase['optimizer'] == 'adamw' else 0.0


def base_rule(phase: Phase, schedule: optax.Schedule) -> optax.GradientTransformation:
  """Keras' update rule of `phase.optimizer`, the learning rate (and sign) included."""
  name = phase['optimizer']
  momentum = phase['momentum'] or None
  if name in ('adam', 'adamw'):
    return keras_adam(schedule, eps=KERAS_EPSILON)
  if name == 'sgd':
    # Keras keeps lr inside its momentum buffer, optax scales the trace by the current lr:
    # the same trajectory at a constant rate.
    return optax.sgd(schedule, momentum=momentum, nesterov=phase['nesterov'])
  if name == 'rmsprop':
    # Keras 3: lr * g / sqrt(velocity + epsilon), epsilon inside the square root, then
    # momentum on that increment (optax.rmsprop's order too).
    return optax.rmsprop(
        schedule, decay=KERAS_RMSPROP_RHO, eps=KERAS_EPSILON, eps_in_sqrt=True, momentum=momentum
    )
  raise ValueError(f'optimizer={name!r}: expected one of {OPTIMIZERS}')


# Keras' Adam (Keras 3 and tf_keras 2.x) updates, at step t = 1, 2, ...
#
#   alpha = lr * sqrt(1 - b2^t) / (1 - b1^t)
#   m += (g - m) * (1 - b1);  v += (g^2 - v) * (1 - b2)
#   var -= alpha * m / (sqrt(v) + eps)
#
# its `epsilon` being the "epsilon hat" of Kingma and Ba (the formula before their section
# 2.1): in optax's terms, an epsilon of eps / sqrt(1 - b2^t) added after the bias
# correction, ~32 * eps at the first step. Where |g| is small (1e-5 with eps = 1e-7) that
# is a large part of the update, so `optax.adam(lr, eps=1e-7)` follows another trajectory.


def scale_by_keras_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
  """Keras' Adam direction, `m * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + eps)`.

  Times -learning_rate it is Keras' update to float32 rounding. The state is optax's
  `ScaleByAdamState(count, mu, nu)` holding the same moments as `optax.scale_by_adam`'s
  (which also differ from Keras' only by rounding), so checkpoints keep their layout.
  Parameter trees may hold `optax.MaskedNode()`s (frozen leaves): they get no state.
  """

  def init(params: optax.Params) -> optax.ScaleByAdamState:
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
    )

  def update(
      updates: optax.Updates, state: optax.ScaleByAdamState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.ScaleByAdamState]:
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    # Hand-written because optax has no epsilon hat: optax.scale_by_adam adds its eps
    # after the bias correction (m_hat / (sqrt(v_hat) + eps), eps fixed at construction)
    # and its eps_root goes inside the square root. The correction is a float32 scalar as
    # in Keras (a power of b2 in bfloat16 would round to 1), cast to each leaf's dtype.
    t = count.astype(jnp.float32)
    correction = jnp.sqrt(1 - jnp.power(jnp.float32(b2), t)) / (1 - jnp.power(jnp.float32(b1), t))
    directions = jax.tree.map(
        lambda m, v: m * correction.astype(m.dtype) / (jnp.sqrt(v) + eps), mu, nu
    )
    return directions, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def keras_adam(
    learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7
) -> optax.GradientTransformation:
  """Keras' Adam at `learning_rate` (a float or an optax schedule of the update count).

  In place of `optax.adam(learning_rate, eps=eps)`, with the same state tree
  (ScaleByAdamState, then the schedule's ScaleByScheduleState).
  """
  return optax.chain(scale_by_keras_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate))


def decays(path: str, batchnorm_layers: frozenset[str], decay_batchnorm: bool) -> bool:
  """Whether weight decay applies to the parameter at `path` ('backbone/conv1_bn/scale').

  Every parameter does, except the scale and offset of the layers in `batchnorm_layers`
  (layer paths such as 'backbone/conv1_bn') unless `decay_batchnorm`.
  """
  if decay_batchnorm:
    return True
  layer, _, name = path.rpartition('/')
  return not (name in BATCHNORM_PARAMS and layer in batchnorm_layers)


def decoupled_weight_decay(
    schedule: optax.Schedule, rate: float, decays_path: Callable[[str], bool]
) -> optax.GradientTransformation:
  """Adds `-schedule(t) * rate * p` to the update of every `p` whose path `decays_path`.

  It follows the update rule in the chain rather than feeding it, so that momentum and
  Adam's normalisation never see the decay (Keras 3 shrinks the variables before its
  update; both use the parameters before the step). optax.add_decayed_weights belongs
  between a rule's direction and its learning rate (where optax.adamw puts it); the rules
  here are whole (optax's, and `keras_adam`), so the decay follows them, scaled by the same
  schedule.
  Parameter trees may hold `optax.MaskedNode()`s (frozen leaves): they have no leaves, so
  get nothing.
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


def update_rule(
    phase: Phase, schedule: optax.Schedule, decays_path: Callable[[str], bool]
) -> optax.GradientTransformation:
  """The phase's update rule at `schedule`, followed by its decoupled weight decay."""
  rule = base_rule(phase, schedule)
  rate = weight_decay(phase)
  if rate == 0:
    return rule
  return optax.chain(rule, decoupled_weight_decay(schedule, rate, decays_path))


registry.register_choices('phases.optimizer', OPTIMIZERS)
