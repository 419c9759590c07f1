"""The Keras-layout backbones and heads against Keras 3 itself (random weights, no download)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import models
from fineflax.models import graph, heads, resnet

pytestmark = pytest.mark.slow  # compares with Keras

# name: (Keras application, the smallest input side it builds at that is quick here)
KERAS_BACKBONES = {
    'resnet50': ('ResNet50', 32),
    'resnet101': ('ResNet101', 32),
    'resnet152': ('ResNet152', 32),
    'vgg16': ('VGG16', 32),
    'xception': ('Xception', 71),
}  # Xception refuses inputs under 71


def _param_counts(variables):
  out = {}
  for collection in variables.values():
    for name, leaves in collection.items():
      out[name] = out.get(name, 0) + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(leaves))
  return out


@pytest.mark.parametrize('name', sorted(KERAS_BACKBONES))
def test_backbone_layers_and_params_equal_keras(keras, name):
  """Same layer names, kinds and order as Keras (so that a freeze spec `layers[:N]` means
  the layers it means in Keras), and the same parameter count per layer."""
  cls, side = KERAS_BACKBONES[name]
  keras.backend.clear_session()  # automatic names (input_layer, add, ...) start afresh
  reference = getattr(keras.applications, cls)(
      include_top=False, weights=None, input_shape=(side, side, 3)
  )
  backbone = models.BACKBONES[name].build()
  assert [(layer.name, layer.kind) for layer in backbone.layers[1:]] == [
      (layer.name, type(layer).__name__) for layer in reference.layers[1:]
  ]
  assert backbone.layers[0].kind == type(reference.layers[0]).__name__ == 'InputLayer'
  assert len(backbone.layers) == len(reference.layers)
  variables = jax.eval_shape(backbone.init, jax.random.key(0), jnp.zeros((1, side, side, 3)))
  counts = _param_counts(variables)
  for layer in reference.layers:
    assert counts.get(layer.name, 0) == layer.count_params(), layer.name


def test_resnet50_facts():
  layers = resnet.ResNet50().layers
  assert len(layers) == 175
  assert layers[142].name == 'conv4_block6_out'
  assert layers[143].name == 'conv5_block1_1_conv'


def _keras_to_flax(keras_model):
  params, stats = {}, {}
  for layer in keras_model.layers:
    w = [np.asarray(x) for x in layer.get_weights()]
    if type(layer).__name__ == 'Conv2D':
      params[layer.name] = {'kernel': w[0], 'bias': w[1]}
    elif type(layer).__name__ == 'BatchNormalization':
      params[layer.name] = {'scale': w[0], 'bias': w[1]}
      stats[layer.name] = {'mean': w[2], 'var': w[3]}
  return {'params': params, 'batch_stats': stats}


def test_resnet50_forward_matches_keras(keras):
  """Padding, strides, BN epsilon: the outputs agree to float32 rounding.

  Tolerance: max |difference| <= 1e-5 x max |output| (float32 accumulation-order noise;
  seen here ~1e-6). BN statistics are randomised so that they matter.
  """
  reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(64, 64, 3))
  rng = np.random.default_rng(0)
  for layer in reference.layers:
    if type(layer).__name__ == 'BatchNormalization':
      c = layer.get_weights()[0].shape
      layer.set_weights(
          [
              rng.uniform(0.5, 1.5, c),
              rng.normal(0, 0.1, c),
              rng.normal(0, 0.1, c),
              rng.uniform(0.5, 1.5, c),
          ]
      )
  x = rng.uniform(-120, 120, (2, 64, 64, 3)).astype(np.float32)
  expected = np.asarray(reference(x, training=False))
  got = np.asarray(resnet.ResNet50().apply(_keras_to_flax(reference), jnp.asarray(x)))
  assert got.shape == expected.shape == (2, 2, 2, 2048)
  assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize(
    'kwargs, names',
    [
        (
            dict(num_classes=1, dropout=0.5, batchnorm=True),  # seed 000
            ['global_average_pooling2d', 'dropout', 'batch_normalization', 'dense'],
        ),
        (dict(num_classes=1, dropout=0.2), ['global_average_pooling2d', 'dropout', 'dense']),
        (
            dict(num_classes=1, pooling='flatten', hidden=(256,), dropout=0.5),  # seed 002
            ['flatten', 'dense', 'dropout', 'dense_1'],
        ),
        (dict(num_classes=10), ['global_average_pooling2d', 'dense']),  # seed 004
    ],
)
def test_head_layers_follow_the_seeds(kwargs, names):
  layers = heads.head_layers(**kwargs)
  assert [layer.name for layer in layers] == names
  assert layers[-1].filters == kwargs['num_classes']
  assert layers[-1].dtype == jnp.float32


def test_head_rejects_unknown_pooling():
  with pytest.raises(ValueError, match="pooling 'mean'"):
    heads.head_layers(10, pooling='mean')


def test_classifier_resizes_and_outputs_float32_logits():
  backbone = resnet.ResNetTiny(dtype=jnp.bfloat16)
  head = graph.KerasGraph(heads.head_layers(3, hidden=(8,)), dtype=jnp.bfloat16)
  model = models.Classifier(backbone, head, image_size=16, preprocessing='tf')
  images = jnp.zeros((2, 8, 8, 3), jnp.uint8)
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, captured = jax.jit(lambda v, x: model.apply(v, x, mutable=['intermediates']))(
      variables, images
  )
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  first = captured['intermediates']['backbone']['layer_outputs'][0]
  assert first.shape == (2, 16, 16, 3) and first.dtype == jnp.bfloat16
