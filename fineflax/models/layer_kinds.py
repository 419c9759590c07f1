"""The Keras layer kinds of ConvNeXt and EfficientNet that the classic convnets lack, each
as Keras computes it.

`Normalization` (fixed mean and variance, or EfficientNet's stored ones), `Rescaling`,
`LayerNormalization`, `LayerScale` and `StochasticDepth` (keras.applications' own ConvNeXt
layers; EfficientNet's drop-connect Dropout draws the same way); `KerasGraph`
(fineflax.models.graph) dispatches to them. The residual add that follows a ConvNeXt block
is an operation in Keras' functional graph, not a layer; the graph applies it
(`Layer.residual`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# keras.applications.convnext's `layer_scale_init_value`, the same in every variant; the
# host initialiser (fineflax.train.state) draws the same constant.
LAYER_SCALE_INIT = 1e-6
# Keras' `backend.epsilon()`, the floor of Normalization's standard deviation.
KERAS_EPSILON = 1e-7
# Keras' LayerNormalization default epsilon (ConvNeXt sets 1e-6 on each of its layers).
LAYER_NORM_EPSILON = 1e-3


def normalization(x: jax.Array, mean: Sequence[float], variance: Sequence[float]) -> jax.Array:
  """Keras `Normalization(mean=..., variance=...)`: (x - mean) / max(sqrt(variance), eps).

  The statistics are constants of the layer (its config), not weights: Keras saves none for
  it, and counts it as 0 parameters. Empty statistics: the identity (torchvision's layout
  normalises outside the network).
  """
  if not mean:
    return x
  mean_ = jnp.asarray(mean, jnp.float32)
  std = jnp.maximum(jnp.sqrt(jnp.asarray(variance, jnp.float32)), KERAS_EPSILON)
  return ((x.astype(jnp.float32) - mean_) / std).astype(x.dtype)


class StoredNormalization(nn.Module):
  """Keras `Normalization()` built without a mean and variance (EfficientNet's input layer):
  the same formula as `normalization`, on its weights `mean`, `variance` and `count`.

  Keras saves them in weight files and counts them as non-trainable parameters; they live
  in 'batch_stats' (as `mean`, `var`, `count`), where no optimizer reaches them and
  `summary` counts them as Keras does. Nothing here updates them (Keras' `adapt` is not a
  training step).
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = (x.shape[-1],)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, channels, jnp.float32).value
    var = self.variable('batch_stats', 'var', jnp.ones, channels, jnp.float32).value
    self.variable('batch_stats', 'count', jnp.zeros, (), jnp.float32)
    std = jnp.maximum(jnp.sqrt(var), KERAS_EPSILON)
    return ((x.astype(jnp.float32) - mean) / std).astype(x.dtype)


def rescaling(x: jax.Array, scale: Sequence[float], offset: float) -> jax.Array:
  """Keras `Rescaling(scale, offset)`: x * scale + offset, with float32 constants (one scale,
  or one per channel)."""
  scale_ = jnp.asarray(scale if len(scale) > 1 else scale[0], jnp.float32)
  return (x.astype(jnp.float32) * scale_ + jnp.float32(offset)).astype(x.dtype)


def layer_norm(x: jax.Array, epsilon: float | None, dtype: Any, name: str) -> jax.Array:
  """Keras `LayerNormalization` over the last axis: `gamma` and `beta` as Flax's `scale`
  and `bias`; the variance is the mean squared deviation (two passes, as Keras'
  `ops.moments`), not E[x^2] - E[x]^2."""
  return nn.LayerNorm(
      epsilon=LAYER_NORM_EPSILON if epsilon is None else epsilon,
      dtype=dtype,
      use_fast_variance=False,
      name=name,
  )(x)


class LayerScale(nn.Module):
  """keras.applications.convnext's `LayerScale`: x times a learned per-channel `gamma`."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param(
        'gamma', nn.initializers.constant(LAYER_SCALE_INIT), (x.shape[-1],), jnp.float32
    )
    return x * gamma.astype(self.dtype)


def stochastic_depth(
    module: nn.Module,
    x: jax.Array,
    rate: float,
    example_keys: jax.Array | None,
    layer_index: int,
) -> jax.Array:
  """keras.applications.convnext's `StochasticDepth` in training mode: each example's
  residual branch is dropped with probability `rate`, else scaled by 1 / (1 - rate).

  With `example_keys` (one key per row, from its index in the global batch) each row draws
  from its own key, so the draw does not depend on how many devices share the batch;
  without them from `module`'s 'dropout' rng.
  """
  keep = 1.0 - rate
  if example_keys is not None:
    keys = jax.vmap(lambda k: jax.random.fold_in(k, layer_index))(example_keys)
    kept = jax.vmap(lambda k: jax.random.bernoulli(k, keep))(keys)
  else:
    kept = jax.random.bernoulli(module.make_rng('dropout'), keep, (x.shape[0],))
  kept = kept.reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.where(kept, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))
