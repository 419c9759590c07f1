"""The train state and its creation; what a checkpoint holds."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fineflax.models import abstract_variables
from fineflax.models.attention import POSITION_EMBEDDING_STD
from fineflax.models.layer_kinds import LAYER_SCALE_INIT
from fineflax.pytree import overlay
from fineflax.train import optimizers


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. `opt_state` covers the trainable leaves only, and so does
  `ema` (None: no moving average; fineflax.train.ema)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = None

  @property
  def variables(self) -> dict[str, Any]:
    """The Flax variables for `model.apply`."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  @property
  def ema_variables(self) -> dict[str, Any]:
    """The Flax variables with the moving average's leaves in place of the parameters'."""
    stats = self.ema.get('batch_stats')
    return {
        'params': overlay(self.params, self.ema['params']),
        'batch_stats': self.batch_stats if stats is None else overlay(self.batch_stats, stats),
    }


def _glorot_limit(shape: tuple[int, ...]) -> float:
  receptive = math.prod(shape[:-2])
  fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
  return math.sqrt(6.0 / (fan_in + fan_out))


# Keras' initialisers by parameter name: glorot_uniform kernels, zero biases, BN,
# LayerNormalization and EfficientNet's Normalization at identity (its `count` 0),
# ConvNeXt's layer scales at their constant.
_INIT = {
    'kernel': 'glorot',
    'depthwise_kernel': 'glorot',
    'pointwise_kernel': 'glorot',
    'bias': 'zeros',
    'scale': 'ones',
    'mean': 'zeros',
    'var': 'ones',
    'count': 'zeros',
    'gamma': 'layer_scale',
    # The Vision Transformer's (fineflax.models.attention), as torchvision initialises
    # them: glorot projections, zero biases and class token, N(0, 0.02) positions.
    'in_kernel': 'glorot',
    'out_kernel': 'glorot',
    'in_bias': 'zeros',
    'out_bias': 'zeros',
    'token': 'zeros',
    'embedding': 'position',
    # LoRA factors (fineflax.models.lora), as peft initialises them: A kaiming-uniform,
    # B zeros, so that the adapted model starts as the base model.
    'lora_a': 'lora',
    'lora_b': 'zeros',
}


def init_variables(
    model: nn.Module, image_shape: tuple[int, int, int], seed: int
) -> dict[str, Any]:
  """Randomly initialised `params` and `batch_stats` for uint8 images of `image_shape`.

  The tree comes from a shape-only trace of `model.init`; the values are drawn on the host
  with Keras' initialisers. Compiling `jit(model.init)` instead costs 8-12 s of XLA time
  on a CPU, even for a small model.
  """
  abstract = abstract_variables(model, image_shape)
  rng = np.random.default_rng(seed)
  # The factors draw from a stream of their own: the base weights of a seed are the same
  # with adapters or without.
  lora_rng = np.random.default_rng([seed, 1])

  def init(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    rule = _INIT.get(name)
    if rule is None:
      raise ValueError(f'no initialiser for parameter {jax.tree_util.keystr(path)}')
    if rule == 'glorot':
      limit = _glorot_limit(leaf.shape)
      return rng.uniform(-limit, limit, leaf.shape).astype(leaf.dtype)
    if rule == 'layer_scale':
      return np.full(leaf.shape, LAYER_SCALE_INIT, leaf.dtype)
    if rule == 'lora':
      limit = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
      return lora_rng.uniform(-limit, limit, leaf.shape).astype(leaf.dtype)
    if rule == 'position':
      return rng.normal(0.0, POSITION_EMBEDDING_STD, leaf.shape).astype(leaf.dtype)
    return (np.zeros if rule == 'zeros' else np.ones)(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(init, abstract)


def create_train_state(
    variables: dict[str, Any], optimizer: optimizers.Optimizer, step: int = 0
) -> TrainState:
  """A state whose optimizer state covers the optimizer's trainable leaves only.

  Starting a new phase is `create_train_state(state.variables, new_optimizer, state.step)`:
  parameters and statistics carry over, the optimizer starts afresh (what Keras'
  re-`compile` after changing `trainable` does).
  """
  params = variables['params']
  return TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=optimizer.init(params),
  )


@jax.jit
def _all_finite(variables: dict[str, Any]) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(variables)]))


def is_finite(state: TrainState) -> bool:
  """Whether every parameter and BatchNorm statistic of `state` is finite (no NaN/inf)."""
  return bool(_all_finite(state.variables))
