"""EfficientNetV2 (Tan and Le 2021) exactly as `keras.applications.EfficientNetV2B0(
include_top=False)` (Keras 3, `include_preprocessing=True`, its default) builds it.

The input layers: for B0 .. B3 `rescaling` (1/255) and `normalization` (ImageNet's mean
and variance, constants of the layer), for S, M and L `rescaling` to [-1, 1]; no variant
has weights there, and Keras builds the same list for any `weights`. Then the stem (a
'same' stride-2 convolution), the Fused-MBConv and MBConv blocks `block1a_` .. and
`top_conv`, `top_bn`, `top_activation`. Every BatchNormalization has Keras' epsilon 1e-3
and EfficientNetV2's momentum 0.9; convolutions pad 'same' (TensorFlow's, as Flax's).

Drop-connect layers (`blockNx_drop`) as in EfficientNet (fineflax.models.efficientnet):
in the list whatever the rate, at `drop_path * b / blocks` for the b-th block, where
`blocks` is the sum of the unscaled repeats, as Keras computes it (and torchvision:
`stochastic_depth_prob * stage_block_id / total_stage_blocks`, per row).

Layout 'torchvision' (S, M and L): the same list with torchvision's weights mapped onto
it (fineflax.weights.torch_files.torch_efficientnet_v2_layers). torchvision's blocks,
squeeze-excite widths, BatchNormalization epsilon (1e-3) and stochastic-depth rates are
Keras'; its convolutions pad symmetrically, (kernel - 1) // 2 a side, where TensorFlow's
'same' pads a stride-2 convolution of an even side only after. The `rescaling` layer is
the identity: torchvision's images are normalised outside the network.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from fineflax.models.efficientnet import keras_top, residual, squeeze_excite, stages, swish_bn
from fineflax.models.graph import KerasGraph, Layer, chain

# keras.applications.efficientnet_v2's DEFAULT_BLOCKS_ARGS: kernel, repeats, filters in,
# out, expand ratio, squeeze-excite ratio, stride, conv type (1: Fused-MBConv, 0: MBConv).
_B = (
    (3, 1, 32, 16, 1, 0, 1, 1),
    (3, 2, 16, 32, 4, 0, 2, 1),
    (3, 2, 32, 48, 4, 0, 2, 1),
    (3, 3, 48, 96, 4, 0.25, 2, 0),
    (3, 5, 96, 112, 6, 0.25, 1, 0),
    (3, 8, 112, 192, 6, 0.25, 2, 0),
)
BLOCKS = {
    's': (
        (3, 2, 24, 24, 1, 0, 1, 1),
        (3, 4, 24, 48, 4, 0, 2, 1),
        (3, 4, 48, 64, 4, 0, 2, 1),
        (3, 6, 64, 128, 4, 0.25, 2, 0),
        (3, 9, 128, 160, 6, 0.25, 1, 0),
        (3, 15, 160, 256, 6, 0.25, 2, 0),
    ),
    'm': (
        (3, 3, 24, 24, 1, 0, 1, 1),
        (3, 5, 24, 48, 4, 0, 2, 1),
        (3, 5, 48, 80, 4, 0, 2, 1),
        (3, 7, 80, 160, 4, 0.25, 2, 0),
        (3, 14, 160, 176, 6, 0.25, 1, 0),
        (3, 18, 176, 304, 6, 0.25, 2, 0),
        (3, 5, 304, 512, 6, 0.25, 1, 0),
    ),
    'l': (
        (3, 4, 32, 32, 1, 0, 1, 1),
        (3, 7, 32, 64, 4, 0, 2, 1),
        (3, 7, 64, 96, 4, 0, 2, 1),
        (3, 10, 96, 192, 4, 0.25, 2, 0),
        (3, 19, 192, 224, 6, 0.25, 1, 0),
        (3, 25, 224, 384, 6, 0.25, 2, 0),
        (3, 7, 384, 640, 6, 0.25, 1, 0),
    ),
    **{b: _B for b in ('b0', 'b1', 'b2', 'b3')},
}
# Width and depth coefficients and default input side (top dropout: 0.2 in every variant).
VARIANTS = {
    'b0': (1.0, 1.0, 224),
    'b1': (1.0, 1.1, 240),
    'b2': (1.1, 1.2, 260),
    'b3': (1.2, 1.4, 300),
    's': (1.0, 1.0, 384),
    'm': (1.0, 1.0, 480),
    'l': (1.0, 1.0, 480),
}
TOP_DROPOUT = 0.2
BN_MOMENTUM = 0.9
# torchvision's classifier dropout (`efficientnet_v2_s` .. `_l`); Keras' is TOP_DROPOUT.
TORCHVISION_DROPOUT = {'s': 0.2, 'm': 0.3, 'l': 0.4}
LAYOUTS = ('keras', 'torchvision')
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # B0 .. B3's Normalization, on [0, 1] pixels
IMAGENET_VARIANCE = (0.229**2, 0.224**2, 0.225**2)


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Keras' `round_filters` of EfficientNetV2 (min_depth 8, no 10% rule)."""
  return int(max(divisor, int(filters * width + divisor / 2) // divisor * divisor))


def _bn(name: str, suffix: str, act: str | None = None) -> list[Layer]:
  if act is None:
    return [Layer(f'{name}{suffix}', 'BatchNormalization', momentum=BN_MOMENTUM)]
  return swish_bn(name, suffix, act, BN_MOMENTUM)


def _conv(name: str, filters: int, kernel: int, stride: int = 1, layout: str = 'keras') -> Layer:
  return Layer(
      name,
      'Conv2D',
      filters=filters,
      kernel=kernel,
      stride=stride,
      padding=_padding(kernel, layout),
      use_bias=False,
  )


def _padding(kernel: int, layout: str) -> str | int:
  """Keras' 'same', or torchvision's (kernel - 1) // 2 zeros on each side."""
  return 'same' if layout == 'keras' else (kernel - 1) // 2


def _block(
    name: str,
    x: str,
    args: tuple,
    fin: int,
    fout: int,
    stride: int,
    rate: float,
    has_drop: bool,
    layout: str,
) -> list[Layer]:
  """Keras' `MBConvBlock` (conv type 0) or `FusedMBConvBlock` (1); torchvision's `MBConv`
  and `FusedMBConv` have the same layers."""
  kernel, _, _, _, expand, se_ratio, _, fused = args
  filters = fin * expand
  layers = []
  if expand != 1:
    size, step = (kernel, stride) if fused else (1, 1)
    layers += [_conv(f'{name}expand_conv', filters, size, step, layout)]
    layers += _bn(name, 'expand_bn', 'expand_activation')
  if not fused:
    layers.append(
        Layer(
            f'{name}dwconv2',
            'DepthwiseConv2D',
            kernel=kernel,
            stride=stride,
            padding=_padding(kernel, layout),
            use_bias=False,
        )
    )
    layers += _bn(name, 'bn', 'activation')
  if 0 < se_ratio <= 1:
    layers += squeeze_excite(
        name, layers[-1].name if layers else x, filters, max(1, int(fin * se_ratio))
    )
  if fused and expand == 1:  # the projection is the block's only convolution
    layers += [_conv(f'{name}project_conv', fout, kernel, stride, layout)]
    layers += _bn(name, 'project_bn', 'project_activation')
  else:
    layers += [_conv(f'{name}project_conv', fout, 1, 1, layout)] + _bn(name, 'project_bn')
  if stride == 1 and fin == fout:
    layers += residual(name, x, layers[-1].name, rate, has_drop)
  return layers


def input_layers(variant: str, layout: str = 'keras') -> list[Layer]:
  """`input_layer` and Keras' preprocessing layers (`include_preprocessing=True`; the
  identity in torchvision's layout)."""
  layers = [Layer('input_layer', 'InputLayer')]
  if layout == 'torchvision':
    return layers + [Layer('rescaling', 'Rescaling', scale=(1.0,))]
  if variant.startswith('b'):
    return layers + [
        Layer('rescaling', 'Rescaling', scale=(1.0 / 255,)),
        Layer('normalization', 'Normalization', mean=IMAGENET_MEAN, variance=IMAGENET_VARIANCE),
    ]
  return layers + [Layer('rescaling', 'Rescaling', scale=(1.0 / 128.0,), offset=-1.0)]


@functools.cache
def efficientnet_v2_layers(
    variant: str, drop_path: float = 0.0, layout: str = 'keras'
) -> tuple[Layer, ...]:
  """The Keras layer list of EfficientNetV2 `variant` ('b0' .. 'b3', 's', 'm', 'l')
  without its top, in `layout` ('keras', or 'torchvision' for S, M and L)."""
  if layout not in LAYOUTS or (layout == 'torchvision' and variant not in TORCHVISION_DROPOUT):
    raise ValueError(f'EfficientNetV2 {variant!r} has no {layout!r} layout')
  width, depth, _ = VARIANTS[variant]
  blocks_args = BLOCKS[variant]
  layers = input_layers(variant, layout)
  layers += [_conv('stem_conv', round_filters(blocks_args[0][2], width), 3, 2, layout)]
  layers += _bn('stem_', 'bn', 'activation')
  blocks = float(sum(args[1] for args in blocks_args))
  b = 0
  for i, args in enumerate(blocks_args):
    fin, fout = round_filters(args[2], width), round_filters(args[3], width)
    stride = args[6]
    for j in range(int(math.ceil(depth * args[1]))):
      if j > 0:
        stride, fin = 1, fout
      name = f'block{i + 1}{chr(j + 97)}_'
      # Keras' default model (drop_connect_rate 0.2) has a drop layer in every residual
      # block but the network's first, whose rate is 0.
      rate = drop_path * b / blocks
      layers += _block(name, layers[-1].name, args, fin, fout, stride, rate, b > 0, layout)
      b += 1
  layers += [_conv('top_conv', round_filters(1280, width), 1, 1, layout)]
  layers += _bn('top_', 'bn', 'activation')
  return chain(layers)


def efficientnet_v2_top(
    variant: str, num_classes: int = 1000, layout: str = 'keras'
) -> tuple[Layer, ...]:
  """Keras' top of EfficientNetV2 (`avg_pool`, `top_dropout`, `predictions`): Keras'
  dropout 0.2 in every variant, torchvision's `classifier` 0.2 / 0.3 / 0.4 in S / M / L."""
  rate = TOP_DROPOUT if layout == 'keras' else TORCHVISION_DROPOUT[variant]
  return keras_top(rate, num_classes)


def v2_stages(variant: str) -> tuple[tuple[str, str], ...]:
  """The stem, the block groups (6, or 7 in M and L) and the top."""
  return stages(len(BLOCKS[variant]))


def EfficientNetV2(
    variant: str, layout: str = 'keras', drop_path: float = 0.0, **kwargs: Any
) -> KerasGraph:
  """An EfficientNetV2 backbone (no top) in `layout`; kwargs go to KerasGraph."""
  return KerasGraph(layers=efficientnet_v2_layers(variant, float(drop_path), layout), **kwargs)
