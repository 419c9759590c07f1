"""A network described as Keras describes it: an ordered list of named layers.

Keras applications define their models as functional graphs, and what users index with
`base_model.layers[:143]` is that graph's layer list. fineflax keeps the same list as the
single source of truth: the Flax module below executes it (Keras' order is a topological
order, so running the layers in list order is valid), the freeze plan indexes it, and the
summary prints it. Parameter-tree keys are the Keras layer names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fineflax.models import attention, layer_kinds

# Keras defaults, so that `model.init` starts where Keras' `weights=None` does (runs draw
# the same distributions on the host: `fineflax.train.state.init_variables`).
KERNEL_INIT = nn.initializers.glorot_uniform()
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Keras layer: its name, its Keras class and the names of the layers it reads."""

  name: str
  kind: str  # the Keras class name: 'Conv2D', 'BatchNormalization', 'Add', ...
  inputs: tuple[str, ...] = ()
  filters: int = 0  # output channels of Conv2D / units of Dense
  kernel: int = 0
  stride: int = 1
  # 'valid' / 'same' for convolutions and pooling; an int: that many zeros on each side
  # (ZeroPadding2D, and torchvision's symmetric convolution padding); 'correct' (a
  # ZeroPadding2D of EfficientNet): Keras' `imagenet_utils.correct_pad` for `kernel`.
  padding: Any = 'valid'
  use_bias: bool = True
  groups: int = 1  # Conv2D: Keras' `groups` (ConvNeXt's depthwise convolution: its channels)
  rate: float = 0.0  # Dropout, StochasticDepth
  # Dropout with Keras' `noise_shape=(None, 1, 1, 1)` (EfficientNet's drop-connect): each
  # example's whole input is dropped, stochastic depth in training when it is listed in
  # `stochastic_depth` (as StochasticDepth is), else the identity.
  per_example: bool = False
  # Activation, fused into Conv2D / Dense ('relu', 'gelu', 'swish', 'sigmoid')
  activation: str | None = None
  dtype: Any = None  # overrides the network's compute dtype (e.g. a float32 classifier)
  epsilon: float | None = None  # LayerNormalization; None: Keras' default 1e-3
  # Normalization: Keras' fixed `mean` and `variance` per channel (constants, not weights).
  mean: tuple[float, ...] = ()
  variance: tuple[float, ...] = ()
  # Normalization without constants (EfficientNet's, an adaptable layer): its mean,
  # variance and count are weights of the file, kept in 'batch_stats' and never trained.
  stored_statistics: bool = False
  # Rescaling: x * scale + offset (one scale, or one per channel).
  scale: tuple[float, ...] = ()
  offset: float = 0.0
  target_shape: tuple[int, ...] = ()  # Reshape: the shape of each example
  heads: int = 0  # MultiHeadAttention: the number of heads
  momentum: float | None = None  # BatchNormalization; None: Keras' default 0.99
  # A layer whose output is added to this one's: Keras' `inputs + layer(x)` at the end of
  # a residual block, an operation of Keras' graph rather than a layer, so that it has no
  # place of its own in the layer list. This layer's output is the sum.
  residual: str | None = None
  sublayers: tuple[Layer, ...] = ()  # Sequential: its layers (params under their names)


def chain(layers: Sequence[Layer]) -> tuple[Layer, ...]:
  """Fills in `inputs` of layers that read the previous layer (a Keras Sequential)."""
  out = []
  for layer in layers:
    if not layer.inputs and out:
      layer = dataclasses.replace(layer, inputs=(out[-1].name,))
    out.append(layer)
  return tuple(out)


class KerasGraph(nn.Module):
  """Runs a Keras layer list; the parameters of layer `name` live under `params[name]`.

  Attributes:
    layers: the layers in Keras order; the first one is the input.
    dtype: compute dtype; parameters stay float32.
    bn_epsilon: BatchNormalization epsilon (Keras ResNet uses 1.001e-5).
    bn_axis_name: mesh axis to average batch statistics over in training-mode BN.
  """

  layers: tuple[Layer, ...]
  dtype: Any = jnp.float32
  bn_epsilon: float = 1e-3
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      *,
      train: bool = False,
      bn_train: frozenset[str] = frozenset(),
      start: int = 0,
      stop: int | None = None,
      example_keys: jax.Array | None = None,
      stochastic_depth: frozenset[str] = frozenset(),
  ) -> jax.Array:
    """Applies the graph, or the chain of layers `layers[start:stop]`.

    Args:
      x: the input batch (with `start > 0`: the output of layer `start - 1`).
      train: enables dropout.
      bn_train: names of BatchNormalization layers that normalise with batch statistics
        and update their moving averages; every other one runs in inference mode (the
        Keras `training=False` rule for fine-tuning).
      start, stop: run only these layers; a layer reading one before `start` reads `x`
        (meant for sequential heads: cached features enter after the pooling layer).
      example_keys: one random key per row of `x` (from its index in the global batch):
        dropout masks are drawn per example from them, so they do not depend on how many
        devices share the batch. Without them dropout draws from the 'dropout' rng.
      stochastic_depth: names of the StochasticDepth layers (and EfficientNet's
        per-example Dropout layers) that drop residual branches when `train` (those of
        trainable blocks: `freeze.stochastic_depth_layers`); the others pass the branch
        through, as in inference.
    Returns:
      The output of the last layer run.
    """
    values: dict[str, jax.Array] = {}
    for layer in self.layers[start:stop]:
      inputs = [values.get(name, x) for name in layer.inputs] or [x]
      y = self._apply_layer(layer, inputs, train, bn_train, example_keys, stochastic_depth)
      if layer.residual is not None:
        y = values.get(layer.residual, x) + y
      # Every layer's output in order (collected only when 'intermediates' is mutable).
      self.sow('intermediates', 'layer_outputs', y)
      values[layer.name] = y
    return y

  def _apply_layer(
      self,
      layer: Layer,
      inputs: list[jax.Array],
      train: bool,
      bn_train: frozenset[str],
      example_keys: jax.Array | None,
      stochastic_depth: frozenset[str] = frozenset(),
  ) -> jax.Array:
    x = inputs[0]
    dtype = layer.dtype or self.dtype
    kind = layer.kind
    if kind == 'InputLayer':
      return x.astype(dtype)
    if kind == 'ZeroPadding2D':
      if layer.padding == 'correct':
        rows, cols = (correct_pad(n, layer.kernel) for n in x.shape[1:3])
      else:
        rows = cols = (layer.padding, layer.padding)
      return jnp.pad(x, ((0, 0), rows, cols, (0, 0)))
    if kind == 'Conv2D':
      y = nn.Conv(
          layer.filters,
          (layer.kernel, layer.kernel),
          strides=(layer.stride, layer.stride),
          padding=_conv_padding(layer.padding),
          feature_group_count=layer.groups,
          use_bias=layer.use_bias,
          dtype=dtype,
          kernel_init=KERNEL_INIT,
          name=layer.name,
      )(x)
      return _activate(y, layer.activation)
    if kind == 'DepthwiseConv2D':  # depth multiplier 1: a convolution of one group a channel
      y = nn.Conv(
          x.shape[-1],
          (layer.kernel, layer.kernel),
          strides=(layer.stride, layer.stride),
          padding=_conv_padding(layer.padding),
          feature_group_count=x.shape[-1],
          use_bias=layer.use_bias,
          dtype=dtype,
          kernel_init=KERNEL_INIT,
          name=layer.name,
      )(x)
      return _activate(y, layer.activation)
    if kind == 'SeparableConv2D':
      y = SeparableConv(
          layer.filters,
          layer.kernel,
          padding=_conv_padding(layer.padding),
          use_bias=layer.use_bias,
          dtype=dtype,
          name=layer.name,
      )(x)
      return _activate(y, layer.activation)
    if kind == 'BatchNormalization':
      training = layer.name in bn_train
      return nn.BatchNorm(
          use_running_average=not training,
          momentum=BN_MOMENTUM if layer.momentum is None else layer.momentum,
          epsilon=self.bn_epsilon,
          dtype=dtype,
          axis_name=self.bn_axis_name if training else None,
          name=layer.name,
      )(x)
    if kind == 'Activation':
      return _activate(x, layer.activation or 'relu')
    if kind == 'Normalization' and layer.stored_statistics:
      return layer_kinds.StoredNormalization(name=layer.name)(x)
    if kind == 'Normalization':
      return layer_kinds.normalization(x, layer.mean, layer.variance)
    if kind == 'Rescaling':
      return layer_kinds.rescaling(x, layer.scale, layer.offset)
    if kind == 'Reshape':
      return x.reshape((x.shape[0],) + tuple(layer.target_shape))
    if kind == 'Multiply':
      out = inputs[0]
      for other in inputs[1:]:
        out = out * other
      return out
    if kind == 'LayerNormalization':
      return layer_kinds.layer_norm(x, layer.epsilon, dtype, layer.name)
    if kind == 'LayerScale':
      return layer_kinds.LayerScale(dtype=dtype, name=layer.name)(x)
    if kind == 'StochasticDepth':
      if train and layer.rate > 0 and layer.name in stochastic_depth:
        index = self.layers.index(layer)
        return layer_kinds.stochastic_depth(self, x, layer.rate, example_keys, index)
      return x
    if kind == 'Sequential':
      return KerasGraph(
          layers=layer.sublayers,
          dtype=dtype,
          bn_epsilon=self.bn_epsilon,
          bn_axis_name=self.bn_axis_name,
          name=layer.name,
      )(x, train=train, example_keys=example_keys)
    if kind == 'MaxPooling2D':
      window = (layer.kernel, layer.kernel)
      # 'same' pads with -inf, as Keras / TensorFlow pooling does.
      return nn.max_pool(
          x, window, strides=(layer.stride, layer.stride), padding=layer.padding.upper()
      )
    if kind in attention.KINDS:
      return attention.apply(layer, x, dtype)
    if kind == 'Add':
      return sum(inputs[1:], inputs[0])
    if kind == 'GlobalAveragePooling2D':
      return jnp.mean(x, axis=(1, 2))
    if kind == 'GlobalMaxPooling2D':
      return jnp.max(x, axis=(1, 2))
    if kind == 'Flatten':
      return x.reshape(x.shape[0], -1)
    if kind == 'Dropout' and layer.per_example:
      if train and layer.rate > 0 and layer.name in stochastic_depth:
        index = self.layers.index(layer)
        return layer_kinds.stochastic_depth(self, x, layer.rate, example_keys, index)
      return x
    if kind == 'Dropout':
      if train and layer.rate > 0 and example_keys is not None:
        return _example_dropout(x, example_keys, layer.rate, self.layers.index(layer))
      return nn.Dropout(layer.rate, deterministic=not train, name=layer.name)(x)
    if kind == 'Dense':
      y = nn.Dense(layer.filters, dtype=dtype, kernel_init=KERNEL_INIT, name=layer.name)(
          x.astype(dtype)
      )
      return _activate(y, layer.activation)
    raise ValueError(f'layer {layer.name!r}: unsupported Keras layer kind {kind!r}')


def _example_dropout(
    x: jax.Array, example_keys: jax.Array, rate: float, layer_index: int
) -> jax.Array:
  """Inverted dropout (as nn.Dropout) with each row's mask drawn from its own key."""
  keep = 1.0 - rate
  keys = jax.vmap(lambda k: jax.random.fold_in(k, layer_index))(example_keys)
  mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, x.shape[1:]))(keys)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SeparableConv(nn.Module):
  """Keras SeparableConv2D: a depthwise convolution (depth multiplier 1), then a 1x1 one.

  Parameters `depthwise_kernel` (k, k, 1, C) and `pointwise_kernel` (1, 1, C, filters),
  plus `bias` when `use_bias`.
  """

  filters: int
  kernel: int
  padding: Any = 'SAME'
  use_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    depthwise = self.param(
        'depthwise_kernel', KERNEL_INIT, (self.kernel, self.kernel, 1, channels), jnp.float32
    )
    pointwise = self.param(
        'pointwise_kernel', KERNEL_INIT, (1, 1, channels, self.filters), jnp.float32
    )
    dims = ('NHWC', 'HWIO', 'NHWC')
    x = x.astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x,
        depthwise.astype(self.dtype),
        (1, 1),
        self.padding,
        dimension_numbers=dims,
        feature_group_count=channels,
    )
    y = jax.lax.conv_general_dilated(
        y, pointwise.astype(self.dtype), (1, 1), 'VALID', dimension_numbers=dims
    )
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.filters,), jnp.float32).astype(
          self.dtype
      )
    return y


def correct_pad(size: int, kernel: int) -> tuple[int, int]:
  """Keras' `imagenet_utils.correct_pad` on one side of a known size: the zeros before
  and after that make a stride-2 'valid' convolution TensorFlow's 'same' one."""
  return (kernel // 2 - (1 - size % 2), kernel // 2)


def _conv_padding(padding: Any) -> Any:
  if isinstance(padding, int):
    return [(padding, padding), (padding, padding)]
  return padding.upper()


def _activate(x: jax.Array, activation: str | None) -> jax.Array:
  if activation is None:
    return x
  if activation == 'relu':
    return nn.relu(x)
  if activation == 'gelu':  # Keras' and torch's GELU: the exact erf form
    return nn.gelu(x, approximate=False)
  if activation == 'linear':
    return x
  if activation == 'swish':  # Keras' swish: x * sigmoid(x)
    return nn.swish(x)
  if activation == 'sigmoid':
    return nn.sigmoid(x)
  raise ValueError(f'unsupported activation {activation!r}')
