"""ConvNeXt (Liu et al. 2022) in two layouts that share one layer list.

'keras': exactly as `keras.applications.ConvNeXtTiny(include_top=False)` (Keras 3) builds
it: the input Normalization layer (ImageNet mean and variance on [0, 255] pixels, constants
of the layer), the stem and the three downsampling blocks as nested Sequential layers, the
blocks' depthwise 7x7 Conv2D, LayerNormalization (epsilon 1e-6), per-pixel Dense layers
(`pointwise_conv_1/2`), exact GELU, LayerScale and a linear Activation (`_identity`) or,
with a drop-path rate, StochasticDepth, and the automatically named
`layer_normalization` at the end (Keras' `include_top=False` path, with `pooling=None`).
Layer names carry the model name (`convnext_tiny_stage_2_block_8_layernorm`). Keras 3
lists no layer for a block's residual add; its last layer here adds it
(`Layer.residual`).

'torchvision': the same list, with torchvision's weights mapped onto it
(fineflax.weights.torch_files.torch_convnext_layers); the Normalization layer is the
identity, since torchvision's images are normalised outside the network ('torch'
preprocessing).
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from fineflax.models.graph import KerasGraph, Layer, chain

EPSILON = 1e-6  # every LayerNormalization of ConvNeXt, in Keras and torchvision alike
# keras.applications.convnext.MODEL_CONFIGS: blocks per stage and widths.
VARIANTS = {
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
    'xlarge': ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
# Keras' PreStem: ImageNet's RGB mean and variance, on [0, 255] pixels.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_VARIANCE = ((0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2)
LAYOUTS = ('keras', 'torchvision')


def _layer_norm(name: str, inputs: tuple[str, ...] = ()) -> Layer:
  return Layer(name, 'LayerNormalization', inputs, epsilon=EPSILON)


def _block(name: str, x: str, width: int, drop_rate: float) -> list[Layer]:
  """Keras' `ConvNeXtBlock`: x + drop(scale(dense(gelu(dense(norm(depthwise(x)))))))."""
  last = (
      Layer(f'{name}_stochastic_depth', 'StochasticDepth', rate=drop_rate, residual=x)
      if drop_rate
      else Layer(f'{name}_identity', 'Activation', activation='linear', residual=x)
  )
  return list(
      chain(
          [
              Layer(
                  f'{name}_depthwise_conv',
                  'Conv2D',
                  (x,),
                  filters=width,
                  kernel=7,
                  padding='same',
                  groups=width,
              ),
              _layer_norm(f'{name}_layernorm'),
              Layer(f'{name}_pointwise_conv_1', 'Dense', filters=4 * width),
              Layer(f'{name}_gelu', 'Activation', activation='gelu'),
              Layer(f'{name}_pointwise_conv_2', 'Dense', filters=width),
              Layer(f'{name}_layer_scale', 'LayerScale'),
              last,
          ]
      )
  )


def drop_rates(depths: tuple[int, ...], drop_path: float) -> list[float]:
  """Each block's drop-path rate: from 0 at the first block to `drop_path` at the last,
  linearly (Keras' `np.linspace(0, drop_path_rate, sum(depths))`, torchvision's
  `p * i / (n - 1)`)."""
  return [float(r) for r in np.linspace(0.0, drop_path, sum(depths))]


@functools.cache
def convnext_layers(
    variant: str,
    layout: str = 'keras',
    drop_path: float = 0.0,
    depths: tuple[int, ...] | None = None,
    widths: tuple[int, ...] | None = None,
) -> tuple[Layer, ...]:
  """The Keras layer list of ConvNeXt `variant` without its top (`depths` and `widths`:
  other blocks per stage and widths under the variant's names, for tests)."""
  if layout not in LAYOUTS:
    raise ValueError(f'ConvNeXt layout {layout!r}: expected one of {list(LAYOUTS)}')
  depths = depths or VARIANTS[variant][0]
  widths = widths or VARIANTS[variant][1]
  p = f'convnext_{variant}'
  keras = layout == 'keras'
  layers = [
      Layer('input_layer', 'InputLayer'),
      Layer(
          f'{p}_prestem_normalization',
          'Normalization',
          ('input_layer',),
          mean=IMAGENET_MEAN if keras else (),
          variance=IMAGENET_VARIANCE if keras else (),
      ),
      Layer(
          f'{p}_stem',
          'Sequential',
          sublayers=chain(
              [
                  Layer(f'{p}_stem_conv', 'Conv2D', filters=widths[0], kernel=4, stride=4),
                  _layer_norm(f'{p}_stem_layernorm'),
              ]
          ),
      ),
  ]
  rates = iter(drop_rates(depths, drop_path))
  for stage, (depth, width) in enumerate(zip(depths, widths)):
    if stage > 0:
      i = stage - 1
      layers.append(
          Layer(
              f'{p}_downsampling_block_{i}',
              'Sequential',
              sublayers=chain(
                  [
                      _layer_norm(f'{p}_downsampling_layernorm_{i}'),
                      Layer(
                          f'{p}_downsampling_conv_{i}', 'Conv2D', filters=width, kernel=2, stride=2
                      ),
                  ]
              ),
          )
      )
    for block in range(depth):
      x = layers[-1].name
      layers += _block(f'{p}_stage_{stage}_block_{block}', x, width, next(rates))
  layers.append(_layer_norm('layer_normalization'))
  return chain(layers)


def convnext_top(variant: str, num_classes: int = 1000) -> tuple[Layer, ...]:
  """Keras' `include_top=True` classifier: `..._head_gap`, `..._head_layernorm` (on the
  pooled vector) and `..._head_dense`. It replaces the backbone's last layer, the
  per-pixel `layer_normalization` of Keras' top-less model (`BackboneSpec.top_replaces`)."""
  p = f'convnext_{variant}'
  return chain(
      [
          Layer(f'{p}_head_gap', 'GlobalAveragePooling2D'),
          _layer_norm(f'{p}_head_layernorm'),
          Layer(f'{p}_head_dense', 'Dense', filters=num_classes, dtype=jnp.float32),
      ]
  )


def stages(variant: str) -> tuple[tuple[str, str], ...]:
  """The stem and the four stages; a downsampling block starts the stage it feeds, as in
  the paper's code (its layer-decay ids) and timm."""
  p = f'convnext_{variant}'
  return (('stem', ''), ('stage1', f'{p}_stage_0_')) + tuple(
      (f'stage{i + 2}', f'{p}_downsampling_block_{i}') for i in range(3)
  )


def ConvNeXt(
    variant: str,
    layout: str = 'keras',
    drop_path: float = 0.0,
    depths: tuple[int, ...] | None = None,
    widths: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> KerasGraph:
  """A ConvNeXt backbone (no top); kwargs go to KerasGraph."""
  layers = convnext_layers(variant, layout, float(drop_path), depths, widths)
  return KerasGraph(layers=layers, **kwargs)
