"""Backbone + head: the model that fineflax trains, fed uint8 images."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fineflax.models import lora as lora_lib, preprocessing
from fineflax.models.graph import KerasGraph, Layer

# Parameter-free layers that turn the backbone's maps into one vector per image.
POOLING_KINDS = ('GlobalAveragePooling2D', 'GlobalMaxPooling2D', 'Flatten')


class Classifier(nn.Module):
  """uint8 images -> resize -> normalisation -> backbone -> head -> float32 logits.

  The resize and the weight family's normalisation run on the device, inside the
  compiled step, so the host only ever ships small uint8 images.

  Attributes:
    backbone: the base model; its parameters live under `params['backbone']`.
    head: the new classifier; its parameters live under `params['head']`.
    image_size: side the images are resized to; None keeps the size they come in.
    preprocessing: a key of `preprocessing.PREPROCESSORS`.
    stages: the backbone's stages, input to output, as (name, prefix of the name of the
      stage's first layer) (`layer_stages`).
    lora: LoRA adapters on the backbone's layers (`fineflax.models.lora`); None: none.
  """

  backbone: KerasGraph
  head: KerasGraph
  image_size: int | None = None
  preprocessing: str = 'caffe'
  stages: tuple[tuple[str, str], ...] = ()
  lora: lora_lib.LoraSpec | None = None

  @nn.compact
  def __call__(
      self,
      images: jax.Array,
      *,
      train: bool = False,
      bn_train: frozenset[str] = frozenset(),
      example_keys: jax.Array | None = None,
      stochastic_depth: frozenset[str] = frozenset(),
  ) -> jax.Array:
    """Logits for a batch of [0, 255] RGB images.

    Args:
      images: (batch, height, width, 3) images, uint8 or float.
      train: enables dropout.
      bn_train: paths ('backbone/conv1_bn', 'head/batch_normalization') of the
        BatchNormalization layers that run in training mode; all others use their
        moving statistics.
      example_keys: one key per image, for dropout masks that do not depend on the
        device count (`KerasGraph`).
      stochastic_depth: paths ('backbone/convnext_tiny_stage_3_block_2_stochastic_depth',
        'backbone/block6d_drop') of the StochasticDepth and EfficientNet's per-example
        Dropout layers that drop residual branches when `train`.
    """
    x = preprocessing.preprocess(preprocessing.resize(images, self.image_size), self.preprocessing)
    x = self._backbone(
        x,
        train=train,
        bn_train=_under(bn_train, 'backbone'),
        example_keys=example_keys,
        stochastic_depth=_under(stochastic_depth, 'backbone'),
    )
    return self.head(x, train=train, bn_train=_under(bn_train, 'head'), example_keys=example_keys)

  def features(self, images: jax.Array) -> jax.Array:
    """What cached-feature mode stores: the frozen part of the network, run in inference
    mode up to and including the head's parameter-free pooling (or Flatten) layer."""
    x = preprocessing.preprocess(preprocessing.resize(images, self.image_size), self.preprocessing)
    x = self._backbone(x)
    return self.head(x, stop=self.feature_layers)

  def _backbone(self, x: jax.Array, **kwargs: Any) -> jax.Array:
    """The backbone, with its adapters when `lora` is set."""
    if self.lora is None:
      return self.backbone(x, **kwargs)
    adapted: list[str] = []
    with nn.intercept_methods(lora_lib.interceptor(self.lora, adapted)):
      y = self.backbone(x, **kwargs)
    if self.is_initializing():
      lora_lib.check_adapted(self.lora, adapted)
    return y

  def classify(
      self,
      features: jax.Array,
      *,
      train: bool = False,
      bn_train: frozenset[str] = frozenset(),
      example_keys: jax.Array | None = None,
      stochastic_depth: frozenset[str] = frozenset(),
  ) -> jax.Array:
    """Logits from `features(images)`: the rest of the head (`stochastic_depth`: unused,
    as the backbone's layers have run, so that both methods take the same arguments)."""
    del stochastic_depth
    return self.head(
        features,
        train=train,
        bn_train=_under(bn_train, 'head'),
        start=self.feature_layers,
        example_keys=example_keys,
    )

  @property
  def feature_layers(self) -> int:
    """How many of the head's first layers `features` includes (its pooling, if any)."""
    return int(self.head.layers[0].kind in POOLING_KINDS)

  def layer_groups(self) -> dict[str, tuple[Layer, ...]]:
    """The Keras layer lists of the parameter groups, keyed by their top-level name."""
    return {'backbone': self.backbone.layers, 'head': self.head.layers}

  def layer_stages(self) -> dict[str, tuple[int, str]]:
    """Each backbone layer's stage: name -> (index from the input, stage name).

    A layer belongs to the last stage begun at or before it in the Keras layer list, so
    unprefixed layers (Xception's `conv2d_1`) join their block; a backbone without stages
    is one stage, 'all'.
    """
    stages = self.stages or (('all', ''),)
    out, current = {}, 0
    for layer in self.backbone.layers:
      # Advance when the next stage's first layer comes (the stem's prefix '' matches all).
      while current + 1 < len(stages) and layer.name.startswith(stages[current + 1][1]):
        current += 1
      out[layer.name] = (current, stages[current][0])
    return out


def _under(paths: frozenset[str], group: str) -> frozenset[str]:
  prefix = group + '/'
  return frozenset(p[len(prefix) :] for p in paths if p.startswith(prefix))


def abstract_variables(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, Any]:
  """{'params', 'batch_stats'} of `model` for uint8 images of `image_shape`, as shapes and
  dtypes only: a trace of `model.init`, no compilation, no FLOPs."""
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.uint8)
  tree = jax.eval_shape(model.init, jax.random.key(0), images)
  return {'params': tree['params'], 'batch_stats': tree.get('batch_stats', {})}
