"""Backbone + head: the model that fineflax trains, fed uint8 images."""

from __future__ import annotations

import flax.linen as nn
import jax

from fineflax.models import preprocessing
from fineflax.models.graph import KerasGraph, Layer


class Classifier(nn.Module):
  """uint8 images -> resize -> normalisation -> backbone -> head -> float32 logits.

  The resize and the weight family's normalisation run on the device, inside the
  compiled step, so the host only ever ships small uint8 images.

  Attributes:
    backbone: the base model; its parameters live under `params['backbone']`.
    head: the new classifier; its parameters live under `params['head']`.
    image_size: side the images are resized to; None keeps the size they come in.
    preprocessing: a key of `preprocessing.PREPROCESSORS`.
  """

  backbone: KerasGraph
  head: KerasGraph
  image_size: int | None = None
  preprocessing: str = 'caffe'

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               bn_train: frozenset[str] = frozenset()) -> jax.Array:
    """Logits for a batch of [0, 255] RGB images.

    Args:
      images: (batch, height, width, 3) images, uint8 or float.
      train: enables dropout.
      bn_train: paths ('backbone/conv1_bn', 'head/batch_normalization') of the
        BatchNormalization layers that run in training mode; all others use their
        moving statistics.
    """
    x = preprocessing.preprocess(preprocessing.resize(images, self.image_size),
                                 self.preprocessing)
    x = self.backbone(x, train=train, bn_train=_under(bn_train, 'backbone'))
    return self.head(x, train=train, bn_train=_under(bn_train, 'head'))

  def layer_groups(self) -> dict[str, tuple[Layer, ...]]:
    """The Keras layer lists of the parameter groups, keyed by their top-level name."""
    return {'backbone': self.backbone.layers, 'head': self.head.layers}


def _under(paths: frozenset[str], group: str) -> frozenset[str]:
  prefix = group + '/'
  return frozenset(p[len(prefix):] for p in paths if p.startswith(prefix))
