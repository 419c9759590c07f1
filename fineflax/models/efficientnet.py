"""EfficientNet (Tan and Le 2019) exactly as `keras.applications.EfficientNetB0(include_top=
False)` (Keras 3) builds it.

The input layers: `rescaling` (1/255), `normalization` (an adaptable Keras Normalization
whose mean, variance and count are weights of the file: `Layer.stored_statistics`) and,
with Keras' own ImageNet weights only, `rescaling_1`: Keras 3 divides once more by the
square root of ImageNet's standard deviations there (the published files hold the
standard deviations where the variances belong; TensorFlow issue 49930), and not when the
same file is given as a path, nor does tf_keras ever. `efficientnet_layers(...,
imagenet=True)` adds it, so that `layers[:N]` means what it means in the matching Keras
model. Then the stem (`stem_conv_pad` on Keras' `correct_pad`, a 'valid' stride-2
convolution), the MBConv blocks `block1a_` .. `block7x_` (depthwise convolutions,
squeeze-and-excite, swish) and `top_conv`, `top_bn`, `top_activation`.

Keras' drop-connect layers (`blockNx_drop`, a Dropout of noise shape (None, 1, 1, 1))
are in the list whatever the rate, as in Keras' default model (drop_connect_rate 0.2);
their rates are `drop_path * b / blocks` for the b-th block, as Keras scales its
drop_connect_rate, and drop_path 0 makes them identities. Keras lists each residual add
as a layer (`blockNx_add`). BatchNormalization: Keras' defaults (epsilon 1e-3,
momentum 0.99).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp

from fineflax.models.graph import KerasGraph, Layer, chain

# keras.applications.efficientnet's DEFAULT_BLOCKS_ARGS: kernel, repeats, filters in, out,
# expand ratio, stride (every block: squeeze-excite ratio 0.25, id_skip).
BLOCKS = (
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
)
SE_RATIO = 0.25
# EfficientNetB0 .. B7: width and depth coefficients, default input side, top dropout.
VARIANTS = {
    'b0': (1.0, 1.0, 224, 0.2),
    'b1': (1.0, 1.1, 240, 0.2),
    'b2': (1.1, 1.2, 260, 0.3),
    'b3': (1.2, 1.4, 300, 0.3),
    'b4': (1.4, 1.8, 380, 0.4),
    'b5': (1.6, 2.2, 456, 0.4),
    'b6': (1.8, 2.6, 528, 0.5),
    'b7': (2.0, 3.1, 600, 0.5),
}
# Keras' `IMAGENET_STDDEV_RGB`: `rescaling_1` multiplies by 1 / sqrt of these.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Keras' `round_filters` of EfficientNet: to a multiple of 8, never 10% below."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * filters else new)


def round_repeats(repeats: int, depth: float) -> int:
  """Keras' `round_repeats`: the block count times the depth coefficient, rounded up."""
  return int(math.ceil(depth * repeats))


def swish_bn(name: str, bn: str, act: str, momentum: float | None = None) -> list[Layer]:
  """BatchNormalization then a swish Activation, under Keras' names."""
  return [
      Layer(f'{name}{bn}', 'BatchNormalization', momentum=momentum),
      Layer(f'{name}{act}', 'Activation', activation='swish'),
  ]


def squeeze_excite(name: str, x: str, filters: int, filters_se: int) -> list[Layer]:
  """Keras' squeeze-and-excite: pool, reshape to 1x1, two 1x1 convolutions (swish and
  sigmoid, with biases), and `x` times the result."""
  return [
      Layer(f'{name}se_squeeze', 'GlobalAveragePooling2D', (x,)),
      Layer(f'{name}se_reshape', 'Reshape', target_shape=(1, 1, filters)),
      Layer(
          f'{name}se_reduce',
          'Conv2D',
          filters=filters_se,
          kernel=1,
          padding='same',
          activation='swish',
      ),
      Layer(
          f'{name}se_expand',
          'Conv2D',
          filters=filters,
          kernel=1,
          padding='same',
          activation='sigmoid',
      ),
      Layer(f'{name}se_excite', 'Multiply', (x, f'{name}se_expand')),
  ]


def residual(name: str, x: str, branch: str, rate: float, has_drop: bool) -> list[Layer]:
  """The drop-connect layer (when Keras' default model has one) and the add of the
  `branch` to the block's input `x`."""
  if not has_drop:
    return [Layer(f'{name}add', 'Add', (branch, x))]
  return [
      Layer(f'{name}drop', 'Dropout', (branch,), rate=rate, per_example=True),
      Layer(f'{name}add', 'Add', (f'{name}drop', x)),
  ]


def _block(
    name: str, x: str, kernel: int, fin: int, fout: int, expand: int, stride: int, rate: float
) -> list[Layer]:
  """Keras' EfficientNet `block`: the inverted residual block (MBConv)."""
  filters = fin * expand
  layers = []
  if expand != 1:
    layers.append(
        Layer(
            f'{name}expand_conv',
            'Conv2D',
            filters=filters,
            kernel=1,
            padding='same',
            use_bias=False,
        )
    )
    layers += swish_bn(name, 'expand_bn', 'expand_activation')
  if stride == 2:
    layers.append(Layer(f'{name}dwconv_pad', 'ZeroPadding2D', padding='correct', kernel=kernel))
  layers.append(
      Layer(
          f'{name}dwconv',
          'DepthwiseConv2D',
          kernel=kernel,
          stride=stride,
          padding='valid' if stride == 2 else 'same',
          use_bias=False,
      )
  )
  layers += swish_bn(name, 'bn', 'activation')
  layers += squeeze_excite(name, f'{name}activation', filters, max(1, int(fin * SE_RATIO)))
  layers += [
      Layer(
          f'{name}project_conv', 'Conv2D', filters=fout, kernel=1, padding='same', use_bias=False
      ),
      Layer(f'{name}project_bn', 'BatchNormalization'),
  ]
  if stride == 1 and fin == fout:
    # Every residual block but the network's first has a drop layer in Keras' default model.
    layers += residual(name, x, f'{name}project_bn', rate, True)
  return layers


def input_layers(imagenet: bool) -> list[Layer]:
  """`input_layer`, `rescaling`, `normalization` and, for Keras 3's ImageNet weights,
  `rescaling_1`."""
  layers = [
      Layer('input_layer', 'InputLayer'),
      Layer('rescaling', 'Rescaling', scale=(1.0 / 255.0,)),
      Layer('normalization', 'Normalization', stored_statistics=True),
  ]
  if imagenet:
    scale = tuple(1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB)
    layers.append(Layer('rescaling_1', 'Rescaling', scale=scale))
  return layers


@functools.cache
def efficientnet_layers(
    variant: str, drop_path: float = 0.0, imagenet: bool = False
) -> tuple[Layer, ...]:
  """The Keras layer list of EfficientNet `variant` ('b0' .. 'b7') without its top;
  `imagenet`: as Keras 3 builds it for `weights='imagenet'` (with `rescaling_1`)."""
  width, depth, _, _ = VARIANTS[variant]
  layers = input_layers(imagenet) + [
      Layer('stem_conv_pad', 'ZeroPadding2D', padding='correct', kernel=3),
      Layer(
          'stem_conv',
          'Conv2D',
          filters=round_filters(32, width),
          kernel=3,
          stride=2,
          use_bias=False,
      ),
      *swish_bn('stem_', 'bn', 'activation'),
  ]
  blocks = float(sum(round_repeats(args[1], depth) for args in BLOCKS))
  b = 0
  for i, (kernel, repeats, fin, fout, expand, stride) in enumerate(BLOCKS):
    fin, fout = round_filters(fin, width), round_filters(fout, width)
    for j in range(round_repeats(repeats, depth)):
      if j > 0:
        stride, fin = 1, fout
      name = f'block{i + 1}{chr(j + 97)}_'
      layers += _block(
          name, layers[-1].name, kernel, fin, fout, expand, stride, drop_path * b / blocks
      )
      b += 1
  layers += [
      Layer(
          'top_conv',
          'Conv2D',
          filters=round_filters(1280, width),
          kernel=1,
          padding='same',
          use_bias=False,
      ),
      *swish_bn('top_', 'bn', 'activation'),
  ]
  return chain(layers)


def keras_top(dropout: float, num_classes: int = 1000) -> tuple[Layer, ...]:
  """Keras' `include_top=True` classifier of EfficientNet (V1 and V2): `avg_pool`,
  `top_dropout`, `predictions`."""
  return chain(
      [
          Layer('avg_pool', 'GlobalAveragePooling2D'),
          Layer('top_dropout', 'Dropout', rate=dropout),
          Layer('predictions', 'Dense', filters=num_classes, dtype=jnp.float32),
      ]
  )


def efficientnet_top(variant: str, num_classes: int = 1000) -> tuple[Layer, ...]:
  """Keras' top of EfficientNet `variant`, with its dropout rate."""
  return keras_top(VARIANTS[variant][3], num_classes)


def stages(blocks: int = len(BLOCKS)) -> tuple[tuple[str, str], ...]:
  """The stem (the input layers with it), the block groups `block1` .. and the top."""
  groups = tuple((f'block{i}', f'block{i}a_') for i in range(1, blocks + 1))
  return (('stem', ''),) + groups + (('top', 'top_'),)


def is_imagenet(weights: str | None) -> bool:
  """Whether `config.model.weights` names Keras' ImageNet weights (not a path to them)."""
  return weights in ('imagenet', 'keras:imagenet')


def EfficientNet(
    variant: str, drop_path: float = 0.0, weights: str | None = None, **kwargs: Any
) -> KerasGraph:
  """An EfficientNet backbone (no top) for `config.model.weights`; kwargs go to KerasGraph."""
  layers = efficientnet_layers(variant, float(drop_path), is_imagenet(weights))
  return KerasGraph(layers=layers, **kwargs)
