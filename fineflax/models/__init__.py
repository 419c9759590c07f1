"""Backbones, heads and the classifier; `BACKBONES` is the registry config names refer to."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fineflax.config import registry
from fineflax.errors import ConfigError
from fineflax.models import (
    convnext,
    efficientnet,
    efficientnet_v2,
    heads,
    lora,
    preprocessing,
    resnet,
    vgg,
    vit,
    xception,
)
from fineflax.models.classifier import Classifier, abstract_variables
from fineflax.models.graph import KerasGraph, Layer
from fineflax.models.heads import head_layers


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """A registered backbone: how to build it, its Keras top, its input normalisation."""

  build: Callable[..., KerasGraph]
  top: Callable[[int], tuple[Layer, ...]]  # Keras' include_top classifier, for n classes
  preprocessing: str
  input_size: int  # the side its ImageNet weights were trained at
  description: str
  # The stages of `stages[A:B]` freeze specs and `phases[i].layer_decay`, input to
  # output: (name, prefix of the name of the stage's first layer); see
  # `Classifier.layer_stages`.
  stages: tuple[tuple[str, str], ...] = ()
  # How many of the last backbone layers Keras' top replaces (ConvNeXt: the per-pixel
  # `layer_normalization` of Keras' top-less model): an `include_top` model lacks them.
  top_replaces: int = 0
  # Whether `build` takes `drop_path` (config.model.drop_path: stochastic depth).
  drop_path: bool = False
  # Whether `build` takes `weights` (config.model.weights): Keras 3's EfficientNet has one
  # more input layer with its own ImageNet weights than with the same file as a path.
  takes_weights: bool = False
  # Whether `build` takes `dropout` (config.model.dropout: the ViT's dropout rate).
  dropout: bool = False


# As the architectures' papers describe them: ResNet's stem (conv1, pool1) and conv2_x ..
# conv5_x; VGG's five blocks; Xception's entry (blocks 1-4), middle (5-12), exit (13-14) flows.
RESNET_STAGES = (
    ('stem', ''),
    ('conv2', 'conv2_'),
    ('conv3', 'conv3_'),
    ('conv4', 'conv4_'),
    ('conv5', 'conv5_'),
)
VGG16_STAGES = tuple((f'block{i}', f'block{i}_') for i in range(1, 6))
XCEPTION_STAGES = (('entry', ''), ('middle', 'block5_'), ('exit', 'block13_'))

BACKBONES: dict[str, BackboneSpec] = {
    'resnet50': BackboneSpec(
        resnet.ResNet50,
        heads.avg_pool_top,
        'caffe',
        224,
        'Keras ResNet50 (v1), 23.6M params',
        stages=RESNET_STAGES,
    ),
    'resnet101': BackboneSpec(
        resnet.ResNet101,
        heads.avg_pool_top,
        'caffe',
        224,
        'Keras ResNet101 (v1), 42.7M params',
        stages=RESNET_STAGES,
    ),
    'resnet152': BackboneSpec(
        resnet.ResNet152,
        heads.avg_pool_top,
        'caffe',
        224,
        'Keras ResNet152 (v1), 58.4M params',
        stages=RESNET_STAGES,
    ),
    'resnet50_torchvision': BackboneSpec(
        resnet.ResNet50Torchvision,
        heads.avg_pool_top,
        'torch',
        224,
        'torchvision / timm ResNet50 (v1.5), 23.5M params',
        stages=RESNET_STAGES,
    ),
    'vgg16': BackboneSpec(
        vgg.VGG16, vgg.vgg16_top, 'caffe', 224, 'Keras VGG16, 14.7M params', stages=VGG16_STAGES
    ),
    'xception': BackboneSpec(
        xception.Xception,
        heads.avg_pool_top,
        'tf',
        299,
        'Keras Xception, 20.9M params',
        stages=XCEPTION_STAGES,
    ),
    'resnet_tiny': BackboneSpec(
        resnet.ResNetTiny,
        heads.avg_pool_top,
        'caffe',
        32,
        'Keras ResNet v1 layout, one block per stage, 1/4 width',
        stages=RESNET_STAGES,
    ),
}

# keras.applications' ConvNeXt variants, and torchvision's (it has no xlarge); top-less
# parameter counts.
_CONVNEXT_PARAMS = {
    'tiny': '27.8M',
    'small': '49.5M',
    'base': '87.6M',
    'large': '196.2M',
    'xlarge': '348.1M',
}
for _variant, _params in _CONVNEXT_PARAMS.items():
  for _layout, _suffix, _norm, _who in [
      ('keras', '', 'raw', 'Keras'),
      ('torchvision', '_torchvision', 'torch', 'torchvision'),
  ]:
    if _layout == 'torchvision' and _variant == 'xlarge':
      continue
    BACKBONES[f'convnext_{_variant}{_suffix}'] = BackboneSpec(
        functools.partial(convnext.ConvNeXt, _variant, _layout),
        functools.partial(convnext.convnext_top, _variant),
        _norm,
        224,
        f'{_who} ConvNeXt-{_variant.capitalize()}, {_params} params',
        stages=convnext.stages(_variant),
        top_replaces=1,
        drop_path=True,
    )

# keras.applications' EfficientNet and EfficientNetV2 variants; top-less parameter counts
# (Keras' count_params, the Normalization's statistics included).
_EFFICIENTNET_PARAMS = {
    'b0': '4.05M',
    'b1': '6.58M',
    'b2': '7.77M',
    'b3': '10.8M',
    'b4': '17.7M',
    'b5': '28.5M',
    'b6': '41.0M',
    'b7': '64.1M',
}
for _variant, _params in _EFFICIENTNET_PARAMS.items():
  BACKBONES[f'efficientnet_{_variant}'] = BackboneSpec(
      functools.partial(efficientnet.EfficientNet, _variant),
      functools.partial(efficientnet.efficientnet_top, _variant),
      'raw',
      efficientnet.VARIANTS[_variant][2],
      f'Keras EfficientNet{_variant.upper()}, {_params} params',
      stages=efficientnet.stages(),
      drop_path=True,
      takes_weights=True,
  )
_EFFICIENTNET_V2_PARAMS = {
    'b0': '5.92M',
    'b1': '6.93M',
    'b2': '8.77M',
    'b3': '12.9M',
    's': '20.3M',
    'm': '53.2M',
    'l': '117.7M',
}
# torchvision's EfficientNetV2 S, M and L: parameter counts without the classifier
# (torchvision's count, BatchNorm statistics not in it), and the normalisation its weights
# were trained with (L's, ported from google/automl: to [-1, 1]).
_EFFICIENTNET_V2_TORCHVISION = {
    's': ('20.2M', 'torch'),
    'm': ('52.9M', 'torch'),
    'l': ('117.2M', 'tf'),
}


def _efficientnet_v2(variant: str, layout: str, norm: str, description: str) -> BackboneSpec:
  return BackboneSpec(
      functools.partial(efficientnet_v2.EfficientNetV2, variant, layout),
      functools.partial(efficientnet_v2.efficientnet_v2_top, variant, layout=layout),
      norm,
      efficientnet_v2.VARIANTS[variant][2],
      description,
      stages=efficientnet_v2.v2_stages(variant),
      drop_path=True,
  )


for _variant, _params in _EFFICIENTNET_V2_PARAMS.items():
  BACKBONES[f'efficientnetv2_{_variant}'] = _efficientnet_v2(
      _variant, 'keras', 'raw', f'Keras EfficientNetV2{_variant.upper()}, {_params} params'
  )
for _variant, (_params, _norm) in _EFFICIENTNET_V2_TORCHVISION.items():
  BACKBONES[f'efficientnet_v2_{_variant}_torchvision'] = _efficientnet_v2(
      _variant,
      'torchvision',
      _norm,
      f'torchvision EfficientNetV2-{_variant.upper()}, {_params} params',
  )

# torchvision's ViT variants; parameter counts with torchvision's 1000-class head.
_VIT_PARAMS = {'b_16': '86.6M', 'b_32': '88.2M', 'l_16': '304.3M', 'l_32': '306.5M'}
for _variant, _params in _VIT_PARAMS.items():
  BACKBONES[f'vit_{_variant}_torchvision'] = BackboneSpec(
      functools.partial(vit.ViT, _variant),
      vit.vit_top,
      'torch',
      224,
      f'torchvision ViT-{_variant.upper().replace("_", "/")}, {_params} params',
      stages=vit.stages(_variant),
      drop_path=True,
      dropout=True,
  )

DTYPES = ('auto', 'float32', 'bfloat16')  # config.dtype (`compute_dtype`)

registry.register_choices('model.backbone', lambda: BACKBONES)
registry.register_choices('dtype', DTYPES)
registry.register_choices('model.preprocessing', ('auto', *preprocessing.PREPROCESSORS))
registry.register_choices('model.head.pooling', heads.POOLING)
registry.register_choices('model.head.activation', heads.ACTIVATIONS)


def _check_drop_path(config: Any) -> None:
  rate = config.model.get('drop_path', 0.0)
  if rate and not BACKBONES[config.model.backbone].drop_path:
    with_it = sorted(name for name, spec in BACKBONES.items() if spec.drop_path)
    raise ConfigError(
        f'config.model.drop_path={rate!r}: backbone {config.model.backbone!r} has no '
        f'stochastic depth (backbones with it: {", ".join(with_it)}); set 0.0'
    )


registry.register_config_check('drop_path', _check_drop_path)


def _check_dropout(config: Any) -> None:
  rate = config.model.get('dropout', 0.0)
  if rate and not BACKBONES[config.model.backbone].dropout:
    with_it = sorted(name for name, spec in BACKBONES.items() if spec.dropout)
    raise ConfigError(
        f'config.model.dropout={rate!r}: backbone {config.model.backbone!r} has no '
        f'dropout of its own (backbones with it: {", ".join(with_it)}; a head has '
        'config.model.head.dropout); set 0.0'
    )


registry.register_config_check('dropout', _check_dropout)


def build_model(
    model_config: Any, num_classes: int, dtype: Any = jnp.float32, bn_axis_name: str | None = None
) -> Classifier:
  """The Classifier that `config.model` describes, with `num_classes` outputs."""
  spec = BACKBONES[model_config.backbone]
  head_cfg = model_config.head
  if model_config.get('include_top', False):
    layers = spec.top(num_classes)
  else:
    layers = head_layers(
        num_classes,
        head_cfg.pooling,
        tuple(head_cfg.hidden),
        head_cfg.dropout,
        head_cfg.batchnorm,
        head_cfg.get('activation', 'relu'),
    )
  head = KerasGraph(layers=layers, dtype=dtype, bn_axis_name=bn_axis_name)
  normalisation = model_config.preprocessing
  if normalisation == 'auto':
    normalisation = spec.preprocessing
  kwargs = {'drop_path': model_config.get('drop_path', 0.0)} if spec.drop_path else {}
  if spec.takes_weights:
    kwargs['weights'] = model_config.get('weights')
  if spec.dropout:
    kwargs['dropout'] = model_config.get('dropout', 0.0)
  backbone = spec.build(dtype=dtype, bn_axis_name=bn_axis_name, **kwargs)
  if model_config.get('include_top', False) and spec.top_replaces:
    backbone = backbone.clone(layers=backbone.layers[: -spec.top_replaces])
  return Classifier(
      backbone=backbone,
      head=head,
      image_size=model_config.image_size,
      preprocessing=normalisation,
      stages=spec.stages,
      lora=lora.spec_from_config(model_config.get('lora')),
  )


def input_size(model_config: Any) -> int:
  """The side the model's images are resized to: `config.model.image_size`, else the
  size the backbone's ImageNet weights were trained at."""
  return model_config.image_size or BACKBONES[model_config.backbone].input_size


def compute_dtype(dtype: str) -> Any:
  """The jnp dtype of `config.dtype` ('auto': bfloat16 on GPU/TPU, float32 on CPU)."""
  if dtype == 'auto':
    return jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32
  return jnp.dtype(dtype)


def resolve_num_classes(model_config: Any, class_names: tuple[str, ...]) -> int:
  """`config.model.num_classes` checked against the dataset (None: the dataset's count)."""
  n, classes = model_config.num_classes, len(class_names)
  if n is None and model_config.get('include_top', False):
    return 1000  # Keras' top is the ImageNet-1k classifier
  if n is None:
    return classes
  if n == 1 and classes != 2:
    raise ConfigError(
        f'config.model.num_classes=1 (a binary classifier) but the dataset has '
        f'{classes} classes {list(class_names)[:5]}; for {classes} classes set '
        f"config.model.num_classes=None (the dataset's count; on the command "
        f'line --config.model.num_classes=None) or {classes}'
    )
  if n != 1 and n < classes:
    raise ConfigError(
        f'config.model.num_classes={n} but the dataset has {classes} classes: '
        f'{list(class_names)}; set config.model.num_classes=None (the '
        f"dataset's count) or {classes}"
    )
  return n


def from_config(config: Any, class_names: tuple[str, ...]) -> Classifier:
  """The classifier of a validated config for a dataset with `class_names`."""
  return build_model(
      config.model,
      resolve_num_classes(config.model, class_names),
      compute_dtype(config.dtype),
      bn_axis_name='batch',
  )


__all__ = [
    'BACKBONES',
    'BackboneSpec',
    'Classifier',
    'KerasGraph',
    'Layer',
    'abstract_variables',
    'build_model',
    'input_size',
    'compute_dtype',
    'from_config',
    'head_layers',
    'resolve_num_classes',
]
