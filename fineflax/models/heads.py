"""Classification heads, built as Keras users build them on top of a base model.

Layer order: pooling (or Flatten), hidden Dense+ReLU layers, Dropout, BatchNormalization,
final Dense. That covers every workflow of docs/seeds.md: GAP-Dropout-BN-Dense(1) (the
damage classifier), GAP-Dropout(0.2)-Dense(1) (the Keras guide),
Flatten-Dense(256)-Dropout(0.5)-Dense(1) (Deep Learning with Python) and
avg-pool-Dense(10) (ResNet50 on CIFAR-10). Layer names are the ones Keras gives them.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from fineflax.models.graph import Layer, chain

POOLING_LAYERS = {
    'avg': Layer('global_average_pooling2d', 'GlobalAveragePooling2D'),
    'max': Layer('global_max_pooling2d', 'GlobalMaxPooling2D'),
    'flatten': Layer('flatten', 'Flatten'),
}
POOLING = tuple(POOLING_LAYERS)  # config.model.head.pooling
ACTIVATIONS = ('relu', 'linear')  # config.model.head.activation ('linear': none)


def head_layers(
    num_classes: int,
    pooling: str = 'avg',
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    batchnorm: bool = False,
    activation: str = 'relu',
) -> tuple[Layer, ...]:
  """The head's Keras layer list; one output unit means a binary (sigmoid) classifier.

  `activation` of the hidden Dense layers: 'relu' or 'linear' (none).
  """
  if pooling not in POOLING_LAYERS:
    raise ValueError(f'head pooling {pooling!r}: expected one of {sorted(POOLING_LAYERS)}')
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}')
  dense_names = ['dense'] + [f'dense_{i}' for i in range(1, len(hidden) + 1)]
  layers = [POOLING_LAYERS[pooling]]
  layers += [
      Layer(name, 'Dense', filters=units, activation=None if activation == 'linear' else activation)
      for name, units in zip(dense_names, hidden)
  ]
  if dropout > 0:
    layers.append(Layer('dropout', 'Dropout', rate=dropout))
  if batchnorm:
    layers.append(Layer('batch_normalization', 'BatchNormalization'))
  # Logits in float32 whatever the compute dtype: the loss needs them exact, and one
  # small matmul costs nothing.
  layers.append(Layer(dense_names[-1], 'Dense', filters=num_classes, dtype=jnp.float32))
  return chain(layers)


def avg_pool_top(num_classes: int = 1000) -> tuple[Layer, ...]:
  """Keras' `include_top=True` classifier of ResNet and Xception: `avg_pool`, `predictions`."""
  return chain(
      [
          Layer('avg_pool', 'GlobalAveragePooling2D'),
          Layer('predictions', 'Dense', filters=num_classes, dtype=jnp.float32),
      ]
  )
