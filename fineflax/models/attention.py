"""The layer kinds of the Vision Transformer, each as torchvision computes it.

`ClassToken` (patches flattened into a sequence, the learned class token in front),
`PositionEmbedding` (a learned embedding added to the sequence), `MultiHeadAttention`
(torch's `nn.MultiheadAttention` on a sequence attending to itself: one input projection
for queries, keys and values, softmax(q k^T / sqrt(d)) v per head, one output projection)
and `ClassTokenOutput` (the class token's row as a 1x1 map, so that the heads' pooling
layers take it as they take a convolutional backbone's map). `KerasGraph`
(fineflax.models.graph) dispatches to them.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's initialisers: the class token at zero, the position embedding drawn from
# N(0, 0.02); the host initialiser (fineflax.train.state) draws the same.
POSITION_EMBEDDING_STD = 0.02
KINDS = ('ClassToken', 'PositionEmbedding', 'MultiHeadAttention', 'ClassTokenOutput')


class ClassToken(nn.Module):
  """(n, h, w, c) patch embeddings -> (n, 1 + h * w, c): the class token, then the patches
  in row-major order (torchvision's `x.reshape(n, c, h * w).permute(0, 2, 1)`)."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    token = self.param('token', nn.initializers.zeros, (1, 1, c), jnp.float32)
    tokens = jnp.broadcast_to(token.astype(self.dtype), (n, 1, c))
    return jnp.concatenate([tokens, x.reshape(n, h * w, c).astype(self.dtype)], axis=1)


class PositionEmbedding(nn.Module):
  """x + a learned (1, sequence, channels) embedding."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    embedding = self.param(
        'embedding',
        nn.initializers.normal(POSITION_EMBEDDING_STD),
        (1,) + x.shape[1:],
        jnp.float32,
    )
    return x + embedding.astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """torch's `nn.MultiheadAttention(c, heads, batch_first=True)` applied as `attn(x, x, x)`.

  Parameters: `in_kernel` (c, 3c) and `in_bias` (3c,), torch's `in_proj_weight`
  transposed and `in_proj_bias` (queries, keys, values in that order); `out_kernel`
  (c, c) and `out_bias`, its `out_proj`.
  """

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, length, c = x.shape
    init = nn.initializers.glorot_uniform()
    in_kernel = self.param('in_kernel', init, (c, 3 * c), jnp.float32)
    in_bias = self.param('in_bias', nn.initializers.zeros, (3 * c,), jnp.float32)
    out_kernel = self.param('out_kernel', init, (c, c), jnp.float32)
    out_bias = self.param('out_bias', nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(self.dtype)
    qkv = x @ in_kernel.astype(self.dtype) + in_bias.astype(self.dtype)
    q, k, v = jnp.split(qkv.reshape(n, length, 3, self.heads, c // self.heads), 3, axis=2)
    # jax.nn.dot_product_attention scales by 1/sqrt(head size), as torch does.
    y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    return y.reshape(n, length, c) @ out_kernel.astype(self.dtype) + out_bias.astype(self.dtype)


def apply(layer: Any, x: jax.Array, dtype: Any) -> jax.Array:
  """Runs `layer` (a `fineflax.models.graph.Layer` of one of `KINDS`) on `x`."""
  if layer.kind == 'ClassToken':
    return ClassToken(dtype=dtype, name=layer.name)(x)
  if layer.kind == 'PositionEmbedding':
    return PositionEmbedding(dtype=dtype, name=layer.name)(x)
  if layer.kind == 'MultiHeadAttention':
    return MultiHeadAttention(heads=layer.heads, dtype=dtype, name=layer.name)(x)
  if layer.kind == 'ClassTokenOutput':
    return x[:, :1, None, :]
  raise ValueError(f'layer {layer.name!r}: not an attention kind: {layer.kind!r}')
