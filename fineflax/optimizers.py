"""Every optimizer fineflax builds, with Keras' defaults where the seeds rely on them."""

from __future__ import annotations

from typing import Any

import optax

# Keras' epsilon for Adam and RMSprop (optax defaults to 1e-8).
KERAS_EPSILON = 1e-7

OPTIMIZERS = ('adam', 'sgd', 'rmsprop')


def build_optimizer(phase: Any) -> optax.GradientTransformation:
  """The optimizer of one phase (`optimizer`, `learning_rate`, `momentum` keys).

  adam: Keras `Adam` (beta 0.9 / 0.999, epsilon 1e-7);
  sgd: plain or with `momentum`;
  rmsprop: Keras `RMSprop` (rho 0.9, epsilon 1e-7 outside the square root, `momentum`).
  """
  lr = phase.learning_rate
  momentum = phase.momentum or None
  if phase.optimizer == 'adam':
    return optax.adam(lr, eps=KERAS_EPSILON)
  if phase.optimizer == 'sgd':
    return optax.sgd(lr, momentum=momentum)
  if phase.optimizer == 'rmsprop':
    return optax.rmsprop(lr, decay=0.9, eps=KERAS_EPSILON, eps_in_sqrt=False, momentum=momentum)
  raise ValueError(f'optimizer {phase.optimizer!r}: expected one of {OPTIMIZERS}')
