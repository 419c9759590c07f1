"""The `onnx` format: the serving function written as a plain ONNX graph, node by node
from the Keras layer list (`fineflax.models.graph`), BatchNormalization folded.

Neither route from JAX gives a clean, exact graph here: tf2onnx cannot read jax2tf's
native serialization (one XlaCallModule op), and jax2onnx pins an orbax-checkpoint older
than fineflax's. The layer list is small and explicit, so it is translated directly: one
ONNX node per Keras layer (named after it), NCHW inside, uint8 NHWC images in and
probabilities out, a symbolic batch dimension. Evaluation's centre crop and resize are a
fixed linear map of each image, read off `augment.prepare` by probing it with row and
column images and checked to be separable (out = A @ image @ B.T per channel): two
MatMuls. Covered layer kinds: those of the ResNet family and VGG (`SUPPORTED`); any other
backbone is refused with a line naming the layer (stablehlo, saved_model and litert cover
every backbone).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from fineflax.data import augment as augmentation
from fineflax.errors import ConfigError
from fineflax.models import preprocessing
from fineflax.models.graph import Layer, correct_pad

SUPPORTED = (
    'InputLayer', 'ZeroPadding2D', 'Conv2D', 'DepthwiseConv2D', 'BatchNormalization',
    'Activation', 'MaxPooling2D', 'Add', 'GlobalAveragePooling2D', 'GlobalMaxPooling2D',
    'Flatten', 'Dropout', 'Dense',
)  # fmt: skip
OPSET = 17


def _onnx() -> Any:
  try:
    import onnx  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(f"--format onnx needs onnx ({e}): pip install 'fineflax[export]'") from None
  return onnx


def crop_and_resize_matrices(
    augment: Any, image_shape: tuple[int, int, int], size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(A, B, offset) with prepare(images) == A @ image @ B.T + offset per channel
  (A: (size, H), B: (size, W), offset (size, size)); ConfigError if it is not."""
  h, w, _ = image_shape
  f = jax.jit(lambda x: augmentation.prepare(x, None, augment, size, train=False)[..., 0])
  zero = np.asarray(f(np.zeros((1, h, w, 3), np.uint8)), np.float64)[0]
  rows = np.zeros((h, h, w, 3), np.uint8)
  rows[np.arange(h), np.arange(h)] = 1
  cols = np.zeros((w, h, w, 3), np.uint8)
  cols[np.arange(w), :, np.arange(w)] = 1
  ones = np.asarray(f(np.ones((1, h, w, 3), np.uint8)), np.float64)[0] - zero
  r = np.asarray(f(rows), np.float64) - zero  # r[k, i, j] = A[i, k] * b[j]
  c = np.asarray(f(cols), np.float64) - zero  # c[k, i, j] = a[i] * B[j, k]
  i0, j0 = np.unravel_index(np.argmax(np.abs(ones)), ones.shape)
  a_mat = r[:, :, j0].T
  b_mat = c[:, i0, :].T / ones[i0, j0]
  test = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), np.uint8)
  want = np.asarray(f(test), np.float64)[0]
  got = a_mat @ test[0, :, :, 0].astype(np.float64) @ b_mat.T + zero
  if not np.abs(got - want).max() <= 1e-3:
    raise ConfigError(
        "onnx: this run's evaluation crop is not a separable linear map of the image; "
        'use --format saved_model or stablehlo'
    )
  return a_mat.astype(np.float32), b_mat.astype(np.float32), zero.astype(np.float32)


def _same(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'same' padding (the extra zero after): (before, after)."""
  total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class _Builder:
  """Nodes and initializers of the graph being written."""

  def __init__(self, onnx: Any):
    self.onnx, self.nodes, self.inits = onnx, [], []

  def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
    self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
    return name

  def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
    self.nodes.append(self.onnx.helper.make_node(op, inputs, [name], name=name, **attrs))
    return name


def _activation(b: _Builder, x: str, activation: str | None, name: str) -> str:
  if activation in (None, 'linear'):
    return x
  if activation == 'relu':
    return b.node('Relu', [x], name)
  if activation == 'sigmoid':
    return b.node('Sigmoid', [x], name)
  if activation == 'swish':
    return b.node('Mul', [x, b.node('Sigmoid', [x], name + '/sigmoid')], name)
  raise ConfigError(f'onnx: layer {name!r}: activation {activation!r} is not supported')


def _pads(layer: Layer, hw: tuple[int, int], kernel: int, stride: int) -> list[int]:
  if isinstance(layer.padding, int):
    return [layer.padding] * 4
  if layer.padding == 'same':
    (t, bo), (le, r) = _same(hw[0], kernel, stride), _same(hw[1], kernel, stride)
    return [t, le, bo, r]
  return [0, 0, 0, 0]


def _layers(b: _Builder, group: str, graph: Any, params: dict, stats: dict, x: str, shape):
  """Appends the nodes of one KerasGraph; returns its output and that output's shape
  ((C, H, W), or (C,) for a vector)."""
  values: dict[str, tuple[str, tuple]] = {}
  y = x
  for layer in graph.layers:
    if layer.kind not in SUPPORTED:
      raise ConfigError(
          f'onnx: layer {group}/{layer.name} of kind {layer.kind} is not supported (the '
          f'ResNet family and VGG are); use --format saved_model or stablehlo'
      )
    ins = [values.get(n, (x, shape)) for n in layer.inputs] or [(x, shape)]
    (x_in, s_in), name, p = ins[0], f'{group}/{layer.name}', params.get(layer.name, {})
    kind, s_out = layer.kind, s_in
    if kind in ('InputLayer', 'Dropout'):
      y = b.node('Identity', [x_in], name)
    elif kind == 'ZeroPadding2D':
      if layer.padding == 'correct':
        (t, bo), (le, r) = correct_pad(s_in[1], layer.kernel), correct_pad(s_in[2], layer.kernel)
      else:
        t = bo = le = r = layer.padding
      y = b.node('Pad', [x_in, b.const(name + '/pads', [0, 0, t, le, 0, 0, bo, r], np.int64)], name)
      s_out = (s_in[0], s_in[1] + t + bo, s_in[2] + le + r)
    elif kind in ('Conv2D', 'DepthwiseConv2D'):
      kernel = np.asarray(p['kernel'])  # (k, k, in / groups, out)
      groups = s_in[0] if kind == 'DepthwiseConv2D' else layer.groups
      pads = _pads(layer, s_in[1:], kernel.shape[0], layer.stride)
      inputs = [x_in, b.const(name + '/kernel', kernel.transpose(3, 2, 0, 1))]
      if 'bias' in p:
        inputs.append(b.const(name + '/bias', p['bias']))
      conv = b.node(
          'Conv', inputs, name + ('/conv' if layer.activation else ''),
          kernel_shape=list(kernel.shape[:2]), strides=[layer.stride] * 2, pads=pads,
          group=groups,
      )  # fmt: skip
      y = _activation(b, conv, layer.activation, name)
      k, st = kernel.shape[0], layer.stride
      s_out = (
          kernel.shape[3],
          (s_in[1] + pads[0] + pads[2] - k) // st + 1,
          (s_in[2] + pads[1] + pads[3] - k) // st + 1,
      )
    elif kind == 'BatchNormalization':
      st = stats[layer.name]
      y = b.node(
          'BatchNormalization',
          [x_in, b.const(name + '/scale', p['scale']), b.const(name + '/bias', p['bias']),
           b.const(name + '/mean', st['mean']), b.const(name + '/var', st['var'])],
          name, epsilon=graph.bn_epsilon,
      )  # fmt: skip
    elif kind == 'Activation':
      y = _activation(b, x_in, layer.activation or 'relu', name)
      if y == x_in:
        y = b.node('Identity', [x_in], name)
    elif kind == 'MaxPooling2D':
      pads = _pads(layer, s_in[1:], layer.kernel, layer.stride)
      y = b.node(
          'MaxPool', [x_in], name, kernel_shape=[layer.kernel] * 2,
          strides=[layer.stride] * 2, pads=pads,
      )  # fmt: skip
      s_out = (
          s_in[0],
          (s_in[1] + pads[0] + pads[2] - layer.kernel) // layer.stride + 1,
          (s_in[2] + pads[1] + pads[3] - layer.kernel) // layer.stride + 1,
      )
    elif kind == 'Add':
      y = b.node('Sum', [v for v, _ in ins], name)
    elif kind in ('GlobalAveragePooling2D', 'GlobalMaxPooling2D'):
      op = 'GlobalAveragePool' if kind == 'GlobalAveragePooling2D' else 'GlobalMaxPool'
      y = b.node('Flatten', [b.node(op, [x_in], name + '/pool')], name, axis=1)
      s_out = (s_in[0],)
    elif kind == 'Flatten':  # Keras flattens NHWC: back to it first
      y = b.node('Flatten', [b.node('Transpose', [x_in], name + '/nhwc', perm=[0, 2, 3, 1])], name)
      s_out = (int(np.prod(s_in)),)
    elif kind == 'Dense':
      mm = b.node('MatMul', [x_in, b.const(name + '/kernel', p['kernel'])], name + '/matmul')
      dense = b.node('Add', [mm, b.const(name + '/bias', p['bias'])], name + '/dense')
      y = _activation(b, dense, layer.activation, name)
      s_out = (np.asarray(p['kernel']).shape[1],)
    if layer.residual is not None:
      y = b.node('Add', [values.get(layer.residual, (x, shape))[0], y], name + '/residual')
    values[layer.name] = (y, s_out)
  return y, s_out


def _normalise(b: _Builder, x: str, mode: str) -> str:
  """The weight family's normalisation (`fineflax.models.preprocessing`), on NCHW."""
  if mode == 'caffe':
    bgr = b.node(
        'Gather', [x, b.const('preprocess/bgr', [2, 1, 0], np.int64)], 'preprocess/bgr_x', axis=1
    )
    mean = np.asarray(preprocessing.CAFFE_MEAN_BGR, np.float32).reshape(1, 3, 1, 1)
    return b.node('Sub', [bgr, b.const('preprocess/mean', mean)], 'preprocess/out')
  if mode == 'tf':
    scaled = b.node('Div', [x, b.const('preprocess/127.5', 127.5)], 'preprocess/scaled')
    return b.node('Sub', [scaled, b.const('preprocess/one', 1.0)], 'preprocess/out')
  if mode == 'torch':
    mean = np.asarray(preprocessing.TORCH_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocessing.TORCH_STD, np.float32).reshape(1, 3, 1, 1)
    unit = b.node('Div', [x, b.const('preprocess/255', 255.0)], 'preprocess/unit')
    centred = b.node('Sub', [unit, b.const('preprocess/mean', mean)], 'preprocess/centred')
    return b.node('Div', [centred, b.const('preprocess/std', std)], 'preprocess/out')
  return x


def write_onnx(serving: Any, out: Path, quantize: str | None = None) -> None:
  """The serving function as an ONNX model (opset OPSET): input 'images' uint8 (batch, H,
  W, 3), output 'probabilities', the metadata under metadata_props['fineflax']."""
  del quantize
  onnx = _onnx()
  model, variables = serving.model, serving.variables
  h, w, _ = serving.image_shape
  size = model.image_size or h
  a_mat, b_mat, offset = crop_and_resize_matrices(serving.augment, serving.image_shape, size)
  b = _Builder(onnx)
  x = b.node('Cast', ['images'], 'input/float', to=onnx.TensorProto.FLOAT)
  x = b.node('Transpose', [x], 'input/nchw', perm=[0, 3, 1, 2])
  x = b.node('MatMul', [x, b.const('crop/B_T', b_mat.T)], 'crop/columns')
  x = b.node('MatMul', [b.const('crop/A', a_mat), x], 'crop/rows')
  if np.any(offset):
    x = b.node('Add', [x, b.const('crop/offset', offset)], 'crop/out')
  x = _normalise(b, x, model.preprocessing)
  params, stats = variables['params'], variables.get('batch_stats', {})
  shape = (3, size, size)
  x, shape = _layers(
      b, 'backbone', model.backbone, params['backbone'], stats.get('backbone', {}), x, shape
  )
  logits, _ = _layers(b, 'head', model.head, params['head'], stats.get('head', {}), x, shape)
  if serving.temperature is not None:
    logits = b.node(
        'Mul', [logits, b.const('temperature/inverse', 1 / serving.temperature)], 'scaled'
    )
  if shape_classes(model) == 1:
    p = b.node('Sigmoid', [logits], 'sigmoid')
    q = b.node('Sub', [b.const('one', [[1.0]]), p], 'one_minus')
    b.node('Concat', [q, p], 'probabilities', axis=1)
  else:
    b.node('Softmax', [logits], 'probabilities', axis=-1)
  graph = onnx.helper.make_graph(
      b.nodes,
      'fineflax',
      [onnx.helper.make_tensor_value_info('images', onnx.TensorProto.UINT8, ['batch', h, w, 3])],
      [
          onnx.helper.make_tensor_value_info(
              'probabilities', onnx.TensorProto.FLOAT, ['batch', len(serving.class_names)]
          )
      ],
      b.inits,
  )
  proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', OPSET)])
  proto.producer_name = 'fineflax'
  onnx.helper.set_model_props(proto, {'fineflax': json.dumps(serving.metadata)})
  onnx.checker.check_model(proto)
  out.write_bytes(proto.SerializeToString())


def shape_classes(model: Any) -> int:
  """The number of logits of `model`'s head (1: a binary sigmoid head)."""
  return model.head.layers[-1].filters


def run_onnx(path: Path) -> Callable[[np.ndarray], np.ndarray]:
  """The .onnx file run by onnxruntime on the CPU."""
  try:
    import onnxruntime  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(
        f"--format onnx needs onnxruntime ({e}): pip install 'fineflax[export]'"
    ) from None
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  return lambda images: session.run(None, {'images': np.ascontiguousarray(images)})[0]
