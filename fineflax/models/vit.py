"""The Vision Transformer (Dosovitskiy et al. 2021) as torchvision builds it, as a layer list.

Keras' applications have no ViT, so the layer names follow torchvision's module paths
(`encoder.layers.encoder_layer_3.mlp.0` is `encoder_layer_3_mlp_0`), and `layers[:N]` means
this list. A patch-embedding convolution (`conv_proj`), the class token in front of the
patches, the position embedding and dropout (`encoder_pos_embedding`,
`encoder_dropout`), the encoder blocks (pre-norm LayerNorm, epsilon 1e-6: multi-head
self-attention, dropout, residual; LayerNorm, MLP with exact GELU and dropout, residual),
the final `encoder_ln`, and the class token's row as a 1x1 map (`class_token_output`), on
which the heads' pooling layers act as the identity.

torchvision's ViT has no stochastic depth; with `drop_path` each block's two residual
branches are dropped per example at a rate rising linearly to `drop_path` at the last
block (as timm and big_vision do). Position embeddings of another grid are interpolated
when weights are loaded (fineflax.weights.vit_files).
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from fineflax.models.graph import KerasGraph, Layer, chain

EPSILON = 1e-6  # every LayerNorm of torchvision's ViT
# torchvision.models.vision_transformer's builders: patch size, blocks, width, MLP width,
# heads.
VARIANTS = {
    'b_16': (16, 12, 768, 3072, 12),
    'b_32': (32, 12, 768, 3072, 12),
    'l_16': (16, 24, 1024, 4096, 16),
    'l_32': (32, 24, 1024, 4096, 16),
}


def _layer_norm(name: str) -> Layer:
  return Layer(name, 'LayerNormalization', epsilon=EPSILON)


def _block(
    name: str, x: str, width: int, mlp: int, heads: int, dropout: float, drop_path: float
) -> list[Layer]:
  """torchvision's `EncoderBlock`: y = x + attention(ln_1(x)); y + mlp(ln_2(y))."""
  first = [
      Layer(f'{name}_ln_1', 'LayerNormalization', (x,), epsilon=EPSILON),
      Layer(f'{name}_self_attention', 'MultiHeadAttention', heads=heads),
      Layer(f'{name}_dropout', 'Dropout', rate=dropout),
      Layer(f'{name}_drop_path_1', 'StochasticDepth', rate=drop_path, residual=x),
  ]
  second = [
      _layer_norm(f'{name}_ln_2'),
      Layer(f'{name}_mlp_0', 'Dense', filters=mlp),
      Layer(f'{name}_mlp_1', 'Activation', activation='gelu'),
      Layer(f'{name}_mlp_2', 'Dropout', rate=dropout),
      Layer(f'{name}_mlp_3', 'Dense', filters=width),
      Layer(f'{name}_mlp_4', 'Dropout', rate=dropout),
      Layer(
          f'{name}_drop_path_2', 'StochasticDepth', rate=drop_path, residual=f'{name}_drop_path_1'
      ),
  ]
  return list(chain(first)) + list(chain([first[-1]] + second))[1:]


@functools.cache
def vit_layers(
    variant: str, drop_path: float = 0.0, dropout: float = 0.0, depth: int | None = None
) -> tuple[Layer, ...]:
  """The layer list of ViT `variant` without its head (`depth`: fewer blocks, for tests)."""
  patch, blocks, width, mlp, heads = VARIANTS[variant]
  blocks = depth or blocks
  layers = [
      Layer('input_layer', 'InputLayer'),
      Layer('conv_proj', 'Conv2D', ('input_layer',), filters=width, kernel=patch, stride=patch),
      Layer('class_token', 'ClassToken'),
      Layer('encoder_pos_embedding', 'PositionEmbedding'),
      Layer('encoder_dropout', 'Dropout', rate=dropout),
  ]
  rates = np.linspace(0.0, drop_path, blocks) if blocks > 1 else [drop_path]
  layers = list(chain(layers))
  for i in range(blocks):
    x = layers[-1].name
    layers += _block(f'encoder_layer_{i}', x, width, mlp, heads, dropout, float(rates[i]))
  layers += [_layer_norm('encoder_ln'), Layer('class_token_output', 'ClassTokenOutput')]
  return chain(layers)


def vit_top(num_classes: int = 1000) -> tuple[Layer, ...]:
  """torchvision's classifier (`heads.head`), on the class token: `flatten`, `heads_head`."""
  return chain(
      [
          Layer('flatten', 'Flatten'),
          Layer('heads_head', 'Dense', filters=num_classes, dtype=jnp.float32),
      ]
  )


def stages(variant: str) -> tuple[tuple[str, str], ...]:
  """The patch embedding (with the class token and position embedding), each encoder
  block, and the final LayerNorm: `layer_decay`'s stages, as in BEiT and big_vision."""
  blocks = VARIANTS[variant][1]
  return (
      (('patch_embedding', ''),)
      + tuple((f'block{i + 1}', f'encoder_layer_{i}_ln_1') for i in range(blocks))
      + (('final_norm', 'encoder_ln'),)
  )


def ViT(
    variant: str,
    drop_path: float = 0.0,
    dropout: float = 0.0,
    depth: int | None = None,
    **kwargs: Any,
) -> KerasGraph:
  """A ViT backbone (no head); kwargs go to KerasGraph."""
  return KerasGraph(layers=vit_layers(variant, float(drop_path), float(dropout), depth), **kwargs)
