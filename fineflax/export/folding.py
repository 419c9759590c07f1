"""Inference-mode BatchNormalization folded into the layer before it.

A BatchNormalization in inference mode is an affine map per channel,
y = (x - mean) / sqrt(var + eps) * scale + bias, so when it reads only a Conv2D,
DepthwiseConv2D or Dense (no fused activation, read by nothing else) it can be merged
into that layer: the kernel's output channels times s = scale / sqrt(var + eps), the bias
(b - mean) * s + bias. The fold works on the Keras layer list (`fineflax.models.graph`),
so it covers every backbone whose BatchNormalization layers directly follow their
convolution: the ResNet family (both layouts, resnet_tiny), VGG, Xception, EfficientNet
(V1, V2). A BatchNormalization after anything else (the head's, after Dropout; one inside
a Sequential) stays as it is.

    folded_model, folded_variables = fold_batchnorm(run.model, run.variables)
    folded_model.apply(folded_variables, images)  # == run.model.apply(run.variables, images)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fineflax.models.classifier import Classifier
from fineflax.models.graph import KerasGraph, Layer

FOLDABLE_KINDS = ('Conv2D', 'DepthwiseConv2D', 'Dense')


def _readers(layers: tuple[Layer, ...]) -> dict[str, int]:
  """How many times each layer's output is read (as an input or as a residual)."""
  counts: dict[str, int] = {}
  for layer in layers:
    for name in layer.inputs + ((layer.residual,) if layer.residual else ()):
      counts[name] = counts.get(name, 0) + 1
  return counts


def fold_graph(
    graph: KerasGraph, params: dict[str, Any], batch_stats: dict[str, Any]
) -> tuple[KerasGraph, dict[str, Any], dict[str, Any], tuple[str, ...]]:
  """`graph` with each foldable BatchNormalization merged into its producer.

  Returns the new graph (each folded BatchNormalization is a linear Activation, so the
  layer list keeps its names and indices), its params and batch_stats (float32) and the
  names of the folded BatchNormalization layers.
  """
  by_name = {layer.name: layer for layer in graph.layers}
  readers = _readers(graph.layers)
  params = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
  batch_stats = dict(batch_stats)
  layers, folded = list(graph.layers), []
  index = {layer.name: i for i, layer in enumerate(layers)}
  for i, bn in enumerate(graph.layers):
    if bn.kind != 'BatchNormalization' or len(bn.inputs) != 1 or bn.name not in batch_stats:
      continue
    producer = by_name.get(bn.inputs[0])
    if (
        producer is None
        or producer.kind not in FOLDABLE_KINDS
        or producer.activation not in (None, 'linear')
        or producer.residual is not None
        or readers.get(producer.name) != 1
        or producer.name not in params
    ):
      continue
    # float64 on the host: the fold itself adds no rounding beyond the final float32 cast.
    stats, affine = batch_stats.pop(bn.name), params.pop(bn.name)
    channels = np.asarray(stats['mean']).shape[-1]
    scale = np.asarray(affine.get('scale', np.ones(channels)), np.float64)
    shift = np.asarray(affine.get('bias', np.zeros(channels)), np.float64)
    s = scale / np.sqrt(np.asarray(stats['var'], np.float64) + graph.bn_epsilon)
    conv = params[producer.name]
    kernel = np.asarray(conv['kernel'], np.float64) * s
    bias = np.asarray(conv.get('bias', np.zeros(channels)), np.float64)
    params[producer.name] = {
        'kernel': kernel.astype(np.float32),
        'bias': ((bias - np.asarray(stats['mean'], np.float64)) * s + shift).astype(np.float32),
    }
    layers[index[producer.name]] = dataclasses.replace(producer, use_bias=True)
    layers[i] = Layer(bn.name, 'Activation', bn.inputs, activation='linear', residual=bn.residual)
    folded.append(bn.name)
  return graph.clone(layers=tuple(layers)), params, batch_stats, tuple(folded)


def fold_batchnorm(
    model: Classifier | KerasGraph, variables: dict[str, Any]
) -> tuple[Classifier | KerasGraph, dict[str, Any]]:
  """`model` and its {'params', 'batch_stats'} with the inference-mode BatchNormalization
  layers folded into the convolution (or Dense) before them; the pair computes what
  `model` computes with `train=False` (to float32 rounding). `model`: a fineflax
  Classifier (its backbone and head are folded apart) or one KerasGraph."""
  params = dict(variables['params'])
  stats = dict(variables.get('batch_stats', {}))
  if isinstance(model, KerasGraph):
    graph, p, s, _ = fold_graph(model, params, stats)
    return graph, {'params': p, 'batch_stats': s}
  graphs = {}
  for group in ('backbone', 'head'):
    graph, params[group], group_stats, _ = fold_graph(
        getattr(model, group), params.get(group, {}), stats.get(group, {})
    )
    graphs[group] = graph
    if group in stats or group_stats:
      stats[group] = group_stats
  return model.clone(**graphs), {'params': params, 'batch_stats': stats}


def folded_layers(model: Classifier | KerasGraph, variables: dict[str, Any]) -> int:
  """How many BatchNormalization layers `fold_batchnorm` folds in `model`."""
  params, stats = variables['params'], variables.get('batch_stats', {})
  if isinstance(model, KerasGraph):
    return len(fold_graph(model, dict(params), dict(stats))[3])
  return sum(
      len(fold_graph(getattr(model, g), dict(params.get(g, {})), dict(stats.get(g, {})))[3])
      for g in ('backbone', 'head')
  )
