"""VGG16 exactly as Keras applications builds it: 3x3 'same' convolutions with a fused
ReLU and biases, 2x2 max-pooling, layer names `block1_conv1` ... `block5_pool`."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp

from fineflax.models.graph import KerasGraph, Layer, chain

_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


@functools.cache
def vgg16_layers() -> tuple[Layer, ...]:
  """The Keras layer list of VGG16 without its top."""
  layers = [Layer('input_layer', 'InputLayer')]
  for block, (filters, convs) in enumerate(_VGG16_BLOCKS, start=1):
    layers += [
        Layer(
            f'block{block}_conv{i}',
            'Conv2D',
            filters=filters,
            kernel=3,
            padding='same',
            activation='relu',
        )
        for i in range(1, convs + 1)
    ]
    layers.append(Layer(f'block{block}_pool', 'MaxPooling2D', kernel=2, stride=2))
  return chain(layers)


def vgg16_top(num_classes: int = 1000) -> tuple[Layer, ...]:
  """Keras' `include_top=True` classifier: Flatten, fc1, fc2 (4096, ReLU), predictions."""
  return chain(
      [
          Layer('flatten', 'Flatten'),
          Layer('fc1', 'Dense', filters=4096, activation='relu'),
          Layer('fc2', 'Dense', filters=4096, activation='relu'),
          Layer('predictions', 'Dense', filters=num_classes, dtype=jnp.float32),
      ]
  )


def VGG16(**kwargs: Any) -> KerasGraph:
  """The Keras-layout VGG16 backbone; kwargs go to KerasGraph."""
  return KerasGraph(layers=vgg16_layers(), **kwargs)
