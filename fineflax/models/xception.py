"""Xception exactly as Keras applications builds it (Chollet 2017).

Layer names and order are Keras' own, including the automatically named layers of the
residual branches (`conv2d`, `batch_normalization`, `add`, `conv2d_1`, ... as a fresh
Keras session names them). Convolutions have no bias; BatchNormalization uses Keras'
default epsilon 1e-3; the pooling of the entry and exit flows is 3x3, stride 2, 'same'.
"""

from __future__ import annotations

import functools
from typing import Any

from fineflax.models.graph import KerasGraph, Layer


def _suffix(i: int) -> str:
  return '' if i == 0 else f'_{i}'


def _sep(name: str, filters: int, inputs: str) -> list[Layer]:
  return [
      Layer(
          name,
          'SeparableConv2D',
          (inputs,),
          filters=filters,
          kernel=3,
          padding='same',
          use_bias=False,
      ),
      Layer(f'{name}_bn', 'BatchNormalization', (name,)),
  ]


def _relu(name: str, inputs: str) -> Layer:
  return Layer(name, 'Activation', (inputs,), activation='relu')


def _downsampling_block(
    block: int,
    x: str,
    filters: tuple[int, int],
    shortcut_index: int,
    add_index: int,
    first_relu: bool,
) -> tuple[list[Layer], str]:
  """An entry/exit-flow block: two separable convs and a pool, plus a strided 1x1 shortcut.

  `shortcut_index` and `add_index` number Keras' automatically named layers.
  """
  p = f'block{block}'
  layers = []
  if first_relu:
    layers.append(_relu(f'{p}_sepconv1_act', x))
    layers += _sep(f'{p}_sepconv1', filters[0], f'{p}_sepconv1_act')
  else:
    layers += _sep(f'{p}_sepconv1', filters[0], x)
  layers.append(_relu(f'{p}_sepconv2_act', f'{p}_sepconv1_bn'))
  layers += _sep(f'{p}_sepconv2', filters[1], f'{p}_sepconv2_act')
  conv, bn = f'conv2d{_suffix(shortcut_index)}', f'batch_normalization{_suffix(shortcut_index)}'
  add = f'add{_suffix(add_index)}'
  layers += [
      Layer(
          conv,
          'Conv2D',
          (x,),
          filters=filters[1],
          kernel=1,
          stride=2,
          padding='same',
          use_bias=False,
      ),
      Layer(f'{p}_pool', 'MaxPooling2D', (f'{p}_sepconv2_bn',), kernel=3, stride=2, padding='same'),
      Layer(bn, 'BatchNormalization', (conv,)),
      Layer(add, 'Add', (f'{p}_pool', bn)),
  ]
  return layers, add


@functools.cache
def xception_layers() -> tuple[Layer, ...]:
  """The Keras layer list of Xception without its top (132 layers)."""
  layers = [
      Layer('input_layer', 'InputLayer'),
      Layer(
          'block1_conv1', 'Conv2D', ('input_layer',), filters=32, kernel=3, stride=2, use_bias=False
      ),
      Layer('block1_conv1_bn', 'BatchNormalization', ('block1_conv1',)),
      _relu('block1_conv1_act', 'block1_conv1_bn'),
      Layer('block1_conv2', 'Conv2D', ('block1_conv1_act',), filters=64, kernel=3, use_bias=False),
      Layer('block1_conv2_bn', 'BatchNormalization', ('block1_conv2',)),
      _relu('block1_conv2_act', 'block1_conv2_bn'),
  ]
  x = 'block1_conv2_act'
  adds = 0
  for i, (block, filters) in enumerate([(2, (128, 128)), (3, (256, 256)), (4, (728, 728))]):
    new, x = _downsampling_block(block, x, filters, i, adds, first_relu=block > 2)
    layers += new
    adds += 1
  for block in range(5, 13):  # the middle flow: 8 residual blocks of 3 separable convs
    p, residual = f'block{block}', x
    inputs = x
    for i in (1, 2, 3):
      layers.append(_relu(f'{p}_sepconv{i}_act', inputs))
      layers += _sep(f'{p}_sepconv{i}', 728, f'{p}_sepconv{i}_act')
      inputs = f'{p}_sepconv{i}_bn'
    x = f'add{_suffix(adds)}'
    layers.append(Layer(x, 'Add', (inputs, residual)))
    adds += 1
  new, x = _downsampling_block(13, x, (728, 1024), 3, adds, first_relu=True)
  layers += new
  layers += _sep('block14_sepconv1', 1536, x)
  layers.append(_relu('block14_sepconv1_act', 'block14_sepconv1_bn'))
  layers += _sep('block14_sepconv2', 2048, 'block14_sepconv1_act')
  layers.append(_relu('block14_sepconv2_act', 'block14_sepconv2_bn'))
  return tuple(layers)


def Xception(**kwargs: Any) -> KerasGraph:
  """The Keras-layout Xception backbone; kwargs go to KerasGraph."""
  return KerasGraph(layers=xception_layers(), **kwargs)
