"""ResNet with bottleneck blocks in two layouts that share one layer list.

'keras': v1 exactly as Keras applications builds it (`keras.applications.ResNet50`, ...):
the stride on the first 1x1 convolution of a block, every convolution with a bias,
BatchNormalization epsilon 1.001e-5, the stem padded explicitly with ZeroPadding2D before
a 'valid' 7x7 convolution and a 'valid' 3x3 max-pool.

'torchvision': v1.5 as torchvision / timm build `resnet50`: the stride on the 3x3
convolution (padded by 1 on every side, as torch pads), no convolution bias, epsilon 1e-5.

Both use Keras' layer names and order (`conv1_conv`, ..., `conv4_block6_out`,
`conv5_block1_1_conv`, ...), so `layers[:143]` of ResNet50 ends at `conv4_block6_out` in
either; the torchvision converter maps torch's names (`layer3.5.conv2`) onto them.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from fineflax.models.graph import KerasGraph, Layer

BN_EPSILON = {'keras': 1.001e-5, 'torchvision': 1e-5}


def _conv(
    name: str,
    filters: int,
    kernel: int,
    inputs: str,
    layout: str,
    stride: int = 1,
    padding: Any = 'valid',
) -> Layer:
  return Layer(
      name,
      'Conv2D',
      (inputs,),
      filters=filters,
      kernel=kernel,
      stride=stride,
      padding=padding,
      use_bias=layout == 'keras',
  )


def _bn(name: str, inputs: str) -> Layer:
  return Layer(name, 'BatchNormalization', (inputs,))


def _relu(name: str, inputs: str) -> Layer:
  return Layer(name, 'Activation', (inputs,), activation='relu')


def _block(
    name: str, x: str, filters: int, stride: int, expansion: int, conv_shortcut: bool, layout: str
) -> list[Layer]:
  """Keras' `block1`: a bottleneck block; Keras lists the shortcut conv after `_2_relu`."""
  keras = layout == 'keras'
  residual = [
      _conv(f'{name}_1_conv', filters, 1, x, layout, stride=stride if keras else 1),
      _bn(f'{name}_1_bn', f'{name}_1_conv'),
      _relu(f'{name}_1_relu', f'{name}_1_bn'),
      _conv(
          f'{name}_2_conv',
          filters,
          3,
          f'{name}_1_relu',
          layout,
          stride=1 if keras else stride,
          padding='same' if keras else 1,
      ),
      _bn(f'{name}_2_bn', f'{name}_2_conv'),
      _relu(f'{name}_2_relu', f'{name}_2_bn'),
  ]
  out = expansion * filters
  if conv_shortcut:
    residual += [
        _conv(f'{name}_0_conv', out, 1, x, layout, stride=stride),
        _conv(f'{name}_3_conv', out, 1, f'{name}_2_relu', layout),
        _bn(f'{name}_0_bn', f'{name}_0_conv'),
        _bn(f'{name}_3_bn', f'{name}_3_conv'),
    ]
    shortcut = f'{name}_0_bn'
  else:
    residual += [
        _conv(f'{name}_3_conv', out, 1, f'{name}_2_relu', layout),
        _bn(f'{name}_3_bn', f'{name}_3_conv'),
    ]
    shortcut = x
  return residual + [
      Layer(f'{name}_add', 'Add', (shortcut, f'{name}_3_bn')),
      _relu(f'{name}_out', f'{name}_add'),
  ]


@functools.cache
def resnet_layers(
    stage_sizes: tuple[int, ...],
    filters: tuple[int, ...] = (64, 128, 256, 512),
    stem_filters: int = 64,
    expansion: int = 4,
    layout: str = 'keras',
) -> tuple[Layer, ...]:
  """The Keras layer list of a bottleneck ResNet (without pooling or top)."""
  if layout not in BN_EPSILON:
    raise ValueError(f'ResNet layout {layout!r}: expected one of {sorted(BN_EPSILON)}')
  if len(stage_sizes) != len(filters):
    raise ValueError(f'stage_sizes {stage_sizes} and filters {filters} differ in length')
  layers = [
      Layer('input_layer', 'InputLayer'),
      Layer('conv1_pad', 'ZeroPadding2D', ('input_layer',), padding=3),
      _conv('conv1_conv', stem_filters, 7, 'conv1_pad', layout, stride=2),
      _bn('conv1_bn', 'conv1_conv'),
      _relu('conv1_relu', 'conv1_bn'),
      Layer('pool1_pad', 'ZeroPadding2D', ('conv1_relu',), padding=1),
      Layer('pool1_pool', 'MaxPooling2D', ('pool1_pad',), kernel=3, stride=2),
  ]
  x = 'pool1_pool'
  for stage, (blocks, width) in enumerate(zip(stage_sizes, filters)):
    for block in range(blocks):
      name = f'conv{stage + 2}_block{block + 1}'
      stride = 2 if stage > 0 and block == 0 else 1
      layers += _block(name, x, width, stride, expansion, block == 0, layout)
      x = f'{name}_out'
  return tuple(layers)


def ResNet(
    stage_sizes: Sequence[int],
    filters: Sequence[int] = (64, 128, 256, 512),
    stem_filters: int = 64,
    layout: str = 'keras',
    **kwargs: Any,
) -> KerasGraph:
  """A ResNet backbone (no pooling, no top); kwargs go to KerasGraph."""
  layers = resnet_layers(tuple(stage_sizes), tuple(filters), stem_filters, layout=layout)
  return KerasGraph(layers=layers, bn_epsilon=BN_EPSILON[layout], **kwargs)


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3))
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3))
ResNet50Torchvision = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), layout='torchvision')
# The same layout, one block per stage and 1/4 of the widths: for CPU tests and the demo.
ResNetTiny = functools.partial(
    ResNet, stage_sizes=(1, 1, 1, 1), filters=(16, 32, 64, 128), stem_filters=16
)
