"""The `keras` format: a Keras 3 `.keras` file of the same network, for a Keras user to
load with `keras.models.load_model`, predict with, or fine-tune further.

The functional model is built from the Keras layer list (`fineflax.models.graph`), whose
names are the ones Keras gives its applications' layers, so a ResNet50 run's file has
`keras.applications.ResNet50`'s layers (`conv1_conv`, ..., `conv5_block3_out`) and the
head's, carrying the run's weights; BatchNormalization is kept (not folded), so the model
trains on in Keras as it would have. In front: uint8 images, evaluation's centre crop and
resize as two fixed EinsumDense maps (`onnx_graph.crop_and_resize_matrices`) and the
weight family's normalisation; behind: softmax (or [1 - p, p] of a one-logit head's
sigmoid), the saved temperature first. Covered: the layer kinds of `onnx_graph.SUPPORTED`
(the ResNet family, VGG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from fineflax.errors import ConfigError
from fineflax.export import onnx_graph
from fineflax.models import preprocessing
from fineflax.models.graph import correct_pad


def _keras() -> Any:
  try:
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(
        f"--format keras needs Keras 3 ({e}): pip install 'fineflax[export]'"
    ) from None
  return keras


def _frozen(layer: Any, weights: list[np.ndarray]) -> Any:
  layer.set_weights([np.asarray(w, np.float32) for w in weights])
  layer.trainable = False
  return layer


def _graph(keras: Any, graph: Any, params: dict, stats: dict, x: Any, group: str) -> Any:
  """Applies one KerasGraph's layers as Keras layers to the tensor `x`."""
  L = keras.layers  # pylint: disable=invalid-name
  values: dict[str, Any] = {}
  y = x
  for layer in graph.layers:
    if layer.kind not in onnx_graph.SUPPORTED:
      raise ConfigError(
          f'keras: layer {group}/{layer.name} of kind {layer.kind} is not supported (the '
          'ResNet family and VGG are); use --format saved_model or stablehlo'
      )
    ins = [values.get(n, x) for n in layer.inputs] or [x]
    x_in, p, kind = ins[0], params.get(layer.name, {}), layer.kind
    weights: list[Any] = []
    if kind == 'InputLayer':
      y = x_in
    elif kind == 'ZeroPadding2D':
      if layer.padding == 'correct':
        pads = tuple(correct_pad(n, layer.kernel) for n in x_in.shape[1:3])
      else:
        pads = ((layer.padding,) * 2,) * 2
      y = L.ZeroPadding2D(pads, name=layer.name)(x_in)
    elif kind in ('Conv2D', 'DepthwiseConv2D'):
      padding = layer.padding
      if isinstance(padding, int):  # torchvision's symmetric padding
        x_in = L.ZeroPadding2D(padding, name=f'{layer.name}_pad')(x_in)
        padding = 'valid'
      kernel = np.asarray(p['kernel'])
      common = dict(
          kernel_size=kernel.shape[0], strides=layer.stride, padding=padding,
          use_bias='bias' in p, activation=layer.activation, name=layer.name,
      )  # fmt: skip
      if kind == 'Conv2D':
        conv = L.Conv2D(kernel.shape[3], groups=layer.groups, **common)
      else:
        conv = L.DepthwiseConv2D(**common)
        kernel = kernel.transpose(0, 1, 3, 2)  # Keras: (k, k, channels, multiplier)
      y = conv(x_in)
      weights = [kernel] + ([p['bias']] if 'bias' in p else [])
      conv.set_weights(weights)
    elif kind == 'BatchNormalization':
      bn = L.BatchNormalization(
          epsilon=graph.bn_epsilon, momentum=layer.momentum or 0.99, name=layer.name
      )
      y = bn(x_in)
      st = stats[layer.name]
      bn.set_weights([p['scale'], p['bias'], st['mean'], st['var']])
    elif kind == 'Activation':
      y = L.Activation(layer.activation or 'relu', name=layer.name)(x_in)
    elif kind == 'MaxPooling2D':
      y = L.MaxPooling2D(layer.kernel, layer.stride, padding=layer.padding, name=layer.name)(x_in)
    elif kind == 'Add':
      y = L.Add(name=layer.name)(ins)
    elif kind == 'GlobalAveragePooling2D':
      y = L.GlobalAveragePooling2D(name=layer.name)(x_in)
    elif kind == 'GlobalMaxPooling2D':
      y = L.GlobalMaxPooling2D(name=layer.name)(x_in)
    elif kind == 'Flatten':
      y = L.Flatten(name=layer.name)(x_in)
    elif kind == 'Dropout':
      y = L.Dropout(layer.rate, name=layer.name)(x_in)
    elif kind == 'Dense':
      dense = L.Dense(p['kernel'].shape[1], activation=layer.activation, name=layer.name)
      y = dense(x_in)
      dense.set_weights([p['kernel'], p['bias']])
    if layer.residual is not None:
      y = L.Add(name=f'{layer.name}_residual')([values.get(layer.residual, x), y])
    values[layer.name] = y
  return y


def build(serving: Any) -> Any:
  """The Keras model of `serving`'s network before the fold (BatchNormalization kept)."""
  keras = _keras()
  L = keras.layers  # pylint: disable=invalid-name
  model, variables = serving.raw_model, serving.raw_variables
  h, w, c = serving.image_shape
  size = model.image_size or h
  a_mat, b_mat, offset = onnx_graph.crop_and_resize_matrices(
      serving.augment, serving.image_shape, size
  )
  if np.any(offset):
    raise ConfigError("keras: this run's evaluation crop fills with a constant; use saved_model")
  images = keras.Input((h, w, c), dtype='uint8', name='images')
  x = L.Rescaling(1.0, name='to_float')(images)
  rows = L.EinsumDense('bhwc,hs->bswc', (size, w, c), name='crop_rows')
  x = rows(x)
  _frozen(rows, [a_mat.T])
  cols = L.EinsumDense('bswc,wt->bstc', (size, size, c), name='crop_columns')
  x = cols(x)
  _frozen(cols, [b_mat.T])
  if model.preprocessing == 'caffe':  # BGR, minus the means: a fixed 1x1 convolution
    norm = L.Conv2D(3, 1, name='caffe_preprocessing')
    x = norm(x)
    _frozen(norm, [np.eye(3)[::-1].reshape(1, 1, 3, 3), -np.asarray(preprocessing.CAFFE_MEAN_BGR)])
  elif model.preprocessing == 'tf':
    x = L.Rescaling(1 / 127.5, offset=-1.0, name='tf_preprocessing')(x)
  elif model.preprocessing == 'torch':
    mean, std = np.asarray(preprocessing.TORCH_MEAN), np.asarray(preprocessing.TORCH_STD)
    x = L.Rescaling(list(1 / (255 * std)), offset=list(-mean / std), name='torch_preprocessing')(x)
  params, stats = variables['params'], variables.get('batch_stats', {})
  x = _graph(keras, model.backbone, params['backbone'], stats.get('backbone', {}), x, 'backbone')
  logits = _graph(keras, model.head, params['head'], stats.get('head', {}), x, 'head')
  if serving.temperature is not None:
    logits = L.Rescaling(1 / serving.temperature, name='temperature')(logits)
  if onnx_graph.shape_classes(model) == 1:
    p = L.Activation('sigmoid', name='sigmoid')(logits)
    q = L.Rescaling(-1.0, offset=1.0, name='one_minus')(p)
    probs = L.Concatenate(name='probabilities')([q, p])
  else:
    probs = L.Softmax(name='probabilities')(logits)
  return keras.Model(images, probs, name='fineflax')


def write_keras(serving: Any, out: Path, quantize: str | None = None) -> None:
  """The Keras model of the run (BatchNormalization kept: `build`), saved."""
  del quantize
  build(serving).save(out)  # `out` ends in .keras (exporter checks)


def run_keras(path: Path) -> Callable[[np.ndarray], np.ndarray]:
  """The .keras file loaded by Keras 3 and called."""
  keras = _keras()
  model = keras.models.load_model(path)
  return lambda images: np.asarray(model(images, training=False))
