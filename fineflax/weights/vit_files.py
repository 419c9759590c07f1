"""torchvision's ViT state dicts mapped onto fineflax's ViT layer list, and the position
embedding resized to another grid of patches, as torchvision resizes it.

Names: `conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_3.self_attention.in_proj_weight`, `encoder.ln`, `heads.head`
become the layers of fineflax.models.vit (`encoder_layer_3_self_attention`, ...), each with
its arrays in fineflax's order (kernels transposed to (in, out), convolutions to HWIO).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from fineflax.weights.torch_files import FileLayers, StateDict

_BLOCK = re.compile(r'^encoder\.layers\.encoder_layer_(\d+)\.')
# torch's bicubic kernel parameter (`upsample_bicubic2d`), not Keys' -0.5 that
# jax.image.resize uses: torchvision resizes ViT position embeddings with it.
_TORCH_CUBIC_A = -0.75


def is_torch_vit(state: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict holds a torchvision ViT (`class_token`, `encoder.pos_embedding`)."""
  return 'class_token' in state and 'encoder.pos_embedding' in state


def torch_vit_layers(
    state: Mapping[str, np.ndarray],
) -> tuple[FileLayers, list[str]]:
  """(layers, state-dict keys nothing was made of) of a torchvision ViT state dict.

  Raises:
    KeyError: a key the layers need is missing (its name).
  """
  s = StateDict(state)
  out: FileLayers = [
      ('conv_proj', s.conv('conv_proj', bias=True)),
      ('class_token', [s.take('class_token')]),
      ('encoder_pos_embedding', [s.take('encoder.pos_embedding')]),
  ]
  blocks = sorted({int(m.group(1)) for key in state if (m := _BLOCK.match(key))})
  for i in blocks:
    m = f'encoder.layers.encoder_layer_{i}'
    name = f'encoder_layer_{i}'
    attention = f'{m}.self_attention'
    out += [
        (f'{name}_ln_1', s.norm(f'{m}.ln_1')),
        (
            f'{name}_self_attention',
            [s.take(f'{attention}.in_proj_weight').T, s.take(f'{attention}.in_proj_bias')]
            + s.dense(f'{attention}.out_proj'),
        ),
        (f'{name}_ln_2', s.norm(f'{m}.ln_2')),
        (f'{name}_mlp_0', s.dense(f'{m}.mlp.0')),
        (f'{name}_mlp_3', s.dense(f'{m}.mlp.3')),
    ]
  out.append(('encoder_ln', s.norm('encoder.ln')))
  if 'heads.head.weight' in state:
    out.append(('heads_head', s.dense('heads.head')))
  return out, s.unused()


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """torch's cubic convolution weights of the 4 taps around each fractional offset `t`."""
  a = _TORCH_CUBIC_A
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """Bicubic resize of one axis, corners aligned, indices clamped at the borders (torch's
  `interpolate(mode='bicubic', align_corners=True)`)."""
  n = x.shape[axis]
  scale = (n - 1) / (size - 1) if size > 1 else 0.0
  src = np.arange(size) * scale
  base = np.floor(src).astype(int)
  w = _cubic_weights(src - base)  # (size, 4)
  taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)  # (size, 4)
  moved = np.moveaxis(x, axis, 0)
  out = np.einsum('st,st...->s...', w, moved[taps])
  return np.moveaxis(out, 0, axis)


def resize_position_embedding(embedding: np.ndarray, length: int) -> np.ndarray:
  """A (1, 1 + g * g, c) embedding (class token first) for a sequence of `length`
  (1 + G * G): the class token's row kept, the g x g grid resized to G x G bicubically
  with corners aligned, as torchvision's `interpolate_embeddings`."""
  _, old, c = embedding.shape
  g, new = math.isqrt(old - 1), math.isqrt(length - 1)
  if g * g != old - 1 or new * new != length - 1:
    raise ValueError(f'position embedding of {old} rows -> {length}: not a square grid + 1')
  grid = embedding[0, 1:].reshape(g, g, c).astype(np.float64)
  grid = _resize_axis(_resize_axis(grid, new, 0), new, 1)
  rows = np.concatenate([embedding[0, :1], grid.reshape(new * new, c)], axis=0)
  return rows[None].astype(embedding.dtype)
