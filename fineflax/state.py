"""The train state and its creation; what a checkpoint holds."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from fineflax import freeze


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. `opt_state` covers the trainable leaves only."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    """The Flax variables for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, image_shape: tuple[int, int, int],
                   seed: int) -> dict[str, Any]:
  """Randomly initialised `params` and `batch_stats` for uint8 images of `image_shape`."""
  images = jnp.zeros((1,) + tuple(image_shape), jnp.uint8)
  init = jax.jit(lambda key: model.init(key, images))
  variables = init(jax.random.key(seed))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def create_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                       labels: freeze.Labels, step: int = 0) -> TrainState:
  """A state whose optimizer state covers the trainable leaves of `labels` only.

  Starting a new phase is `create_train_state(state.variables, new_tx, new_labels,
  state.step)`: parameters and statistics carry over, the optimizer starts afresh (what
  Keras' re-`compile` after changing `trainable` does).
  """
  params = variables['params']
  opt_state = tx.init(freeze.trainable_view(params, labels))
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=opt_state)
