"""torchvision / timm state dicts mapped onto the layer names fineflax uses, each layer's
arrays in Keras' weight order: ResNet50 (`layer3.5.conv2` is `conv4_block6_2_conv`),
ConvNeXt (`features.5.8.block.3` is `convnext_tiny_stage_2_block_8_pointwise_conv_1`) and
EfficientNetV2 (`features.4.0.block.1.0` is `block4a_dwconv2`), all on Keras' layer lists;
the ViT's names are fineflax.weights.vit_files'. A key that a layer needs and the file
lacks raises KeyError (the key).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from fineflax.models.graph import Layer

FileLayers = list[tuple[str, list[np.ndarray]]]


class StateDict:
  """A state dict read module by module into Keras' weight order, keeping track of the
  keys read (`unused`: those nothing was made of)."""

  def __init__(self, state: Mapping[str, np.ndarray]):
    self.state = state
    self.used: set[str] = set()

  def take(self, key: str) -> np.ndarray:
    """The array of `key`, marked as used (KeyError: the file lacks it)."""
    value = np.asarray(self.state[key])
    self.used.add(key)
    return value

  def conv(self, module: str, bias: bool = False) -> list[np.ndarray]:
    """A convolution's kernel (OIHW -> HWIO) and, with `bias`, its bias."""
    kernel = [self.take(f'{module}.weight').transpose(2, 3, 1, 0)]
    return kernel + ([self.take(f'{module}.bias')] if bias else [])

  def depthwise(self, module: str) -> list[np.ndarray]:
    """A depthwise convolution's kernel, (C, 1, k, k) -> Keras' (k, k, C, 1)."""
    return [self.take(f'{module}.weight').transpose(2, 3, 0, 1)]

  def norm(self, module: str) -> list[np.ndarray]:
    """A LayerNorm's weight and bias (Keras' gamma and beta)."""
    return [self.take(f'{module}.weight'), self.take(f'{module}.bias')]

  def batch_norm(self, module: str) -> list[np.ndarray]:
    """A BatchNorm's gamma, beta, moving mean and moving variance."""
    return self.norm(module) + [self.take(f'{module}.running_{k}') for k in ('mean', 'var')]

  def dense(self, module: str) -> list[np.ndarray]:
    """A Linear layer's weight, transposed to (in, out), and bias."""
    return [self.take(f'{module}.weight').T, self.take(f'{module}.bias')]

  def unused(self) -> list[str]:
    """The keys nothing was made of (besides BatchNorm's `num_batches_tracked`)."""
    return [k for k in self.state if k not in self.used and not k.endswith('num_batches_tracked')]


_TORCH_BLOCK = re.compile(r'^layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])\.')


def _resnet_name(module: str) -> str | None:
  if module in ('conv1', 'bn1', 'fc'):
    return {'conv1': 'conv1_conv', 'bn1': 'conv1_bn', 'fc': 'predictions'}[module]
  m = _TORCH_BLOCK.match(module + '.')
  if not m:
    return None
  stage, block, part = int(m.group(1)), int(m.group(2)), m.group(3)
  suffix = {'downsample.0': '0_conv', 'downsample.1': '0_bn'}.get(part, f'{part[-1]}_{part[:-1]}')
  return f'conv{stage + 1}_block{block + 1}_{suffix}'


def torch_resnet_layers(state: Mapping[str, np.ndarray]) -> tuple[FileLayers, list[str]]:
  """torchvision / timm ResNet names -> fineflax's Keras layer names and weight order
  (`fc` -> `predictions`); returns the layers and the keys nothing was made of."""
  s = StateDict(state)
  out: FileLayers = []
  for module in dict.fromkeys(key.rsplit('.', 1)[0] for key in state):
    name = _resnet_name(module)
    if name is None:
      continue
    if name.endswith('_bn'):
      out.append((name, s.batch_norm(module)))
    elif name == 'predictions':
      out.append((name, s.dense(module)))
    else:
      out.append((name, s.conv(module)))
  return out, s.unused()


_TORCH_CONVNEXT_BLOCK = re.compile(r'^features\.(\d+)\.(\d+)\.(block\.[0235]|layer_scale)')
# CNBlock.block's modules: depthwise conv, (permute), LayerNorm, Linear, (GELU), Linear.
_CONVNEXT_BLOCK_PARTS = {
    'block.0': 'depthwise_conv',
    'block.2': 'layernorm',
    'block.3': 'pointwise_conv_1',
    'block.5': 'pointwise_conv_2',
    'layer_scale': 'layer_scale',
}


def is_torch_convnext(state: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict holds a torchvision ConvNeXt (`features.1.0.layer_scale`)."""
  return any(_TORCH_CONVNEXT_BLOCK.match(key) for key in state) and not is_torch_efficientnet(state)


def torch_convnext_layers(
    state: Mapping[str, np.ndarray], backbone: Sequence[Layer]
) -> tuple[FileLayers, list[str]]:
  """torchvision ConvNeXt names -> the Keras layer names of the model's `backbone`.

  Names take the model's prefix (`convnext_tiny`), so that a file of another variant fails
  as a file of another backbone. `features.0` is the stem, `features.1/3/5/7` the stages,
  `features.2/4/6` the downsampling blocks; `classifier.0`, the LayerNorm after the
  pooling, becomes the backbone's last `layer_normalization` when the model has one (a new
  head) and Keras' `..._head_layernorm` otherwise, `classifier.2` `..._head_dense`. Layer
  scales (C, 1, 1) -> (C,). Returns the layers and the keys nothing was made of.
  """
  names = {layer.name for layer in backbone}
  stem = next((n for n in names if n.endswith('_stem')), 'convnext_stem')
  p = stem[: -len('_stem')]
  s = StateDict(state)
  out: FileLayers = []
  if 'features.0.0.weight' in state:
    out.append((f'{p}_stem', s.conv('features.0.0', bias=True) + s.norm('features.0.1')))
  for key in state:
    m = _TORCH_CONVNEXT_BLOCK.match(key)
    if m is None or key in s.used:
      continue
    feature, block, part = int(m.group(1)), int(m.group(2)), m.group(3)
    module = f'features.{feature}.{block}.{part}'
    name = f'{p}_stage_{(feature - 1) // 2}_block_{block}_{_CONVNEXT_BLOCK_PARTS[part]}'
    if part == 'layer_scale':
      out.append((name, [s.take(module).reshape(-1)]))
    elif part == 'block.0':
      out.append((name, s.conv(module, bias=True)))
    else:
      out.append((name, (s.norm if part == 'block.2' else s.dense)(module)))
  for i, feature in enumerate((2, 4, 6)):
    if f'features.{feature}.1.weight' in state:
      module = f'features.{feature}'
      conv = s.conv(f'{module}.1', bias=True)
      out.append((f'{p}_downsampling_block_{i}', s.norm(f'{module}.0') + conv))
  if 'classifier.0.weight' in state:
    last = 'layer_normalization' if 'layer_normalization' in names else f'{p}_head_layernorm'
    out.append((last, s.norm('classifier.0')))
  if 'classifier.2.weight' in state:
    out.append((f'{p}_head_dense', s.dense('classifier.2')))
  return out, s.unused()


_TORCH_EFFICIENTNET_BLOCK = re.compile(r'^features\.(\d+)\.(\d+)\.block\.(\d+)\.')


def is_torch_efficientnet(state: Mapping[str, np.ndarray]) -> bool:
  """Whether a state dict holds a torchvision EfficientNet: blocks of `block.k` modules
  (as ConvNeXt's) and a BatchNorm after the stem's convolution (`features.0.1`), where
  ConvNeXt has a LayerNorm."""
  blocks = any(_TORCH_EFFICIENTNET_BLOCK.match(key) for key in state)
  return blocks and 'features.0.1.running_var' in state


def _efficientnet_block(s: StateDict, name: str, module: str, parts: list[int]) -> FileLayers:
  """One `MBConv` / `FusedMBConv`: its `block.k` modules in order are Conv2dNormActivations
  (expansion, depthwise: MBConv only, projection) and, in MBConv, the SqueezeExcitation
  before the projection; a Fused-MBConv without expansion has its projection alone."""
  se = [k for k in parts if f'{module}.{k}.fc1.weight' in s.state]
  convs = [k for k in parts if k not in se]
  # The projection comes last; before it, the expansion (when there is one) and, in an
  # MBConv, the depthwise convolution.
  before = ('expand', 'dwconv2') if se else ('expand',)
  roles = before[len(before) - len(convs) + 1 :] + ('project',)
  keras = {
      'expand': ('expand_conv', 'expand_bn'),
      'dwconv2': ('dwconv2', 'bn'),
      'project': ('project_conv', 'project_bn'),
  }
  out: FileLayers = []
  for k, role in zip(convs, roles, strict=True):
    conv, bn = keras[role]
    read = s.depthwise if role == 'dwconv2' else s.conv
    out += [
        (f'{name}{conv}', read(f'{module}.{k}.0')),
        (f'{name}{bn}', s.batch_norm(f'{module}.{k}.1')),
    ]
    if se and k + 1 == se[0]:
      squeeze = f'{module}.{se[0]}'
      out += [
          (f'{name}se_reduce', s.conv(f'{squeeze}.fc1', bias=True)),
          (f'{name}se_expand', s.conv(f'{squeeze}.fc2', bias=True)),
      ]
  return out


def torch_efficientnet_v2_layers(state: Mapping[str, np.ndarray]) -> tuple[FileLayers, list[str]]:
  """torchvision EfficientNetV2 names -> the Keras layer names of
  fineflax.models.efficientnet_v2: `features.0` is the stem (`stem_conv`, `stem_bn`),
  block j of `features.i` is `block{i}{'abc..'[j]}_`, the last feature the head's
  convolution (`top_conv`, `top_bn`) and `classifier.1` `predictions`. Returns the
  layers and the keys nothing was made of."""
  s = StateDict(state)
  blocks: dict[tuple[int, int], list[int]] = {}
  for key in state:
    if m := _TORCH_EFFICIENTNET_BLOCK.match(key):
      parts = blocks.setdefault((int(m.group(1)), int(m.group(2))), [])
      if int(m.group(3)) not in parts:
        parts.append(int(m.group(3)))
  out: FileLayers = [
      ('stem_conv', s.conv('features.0.0')),
      ('stem_bn', s.batch_norm('features.0.1')),
  ]
  for (i, j), parts in blocks.items():
    out += _efficientnet_block(s, f'block{i}{chr(j + 97)}_', f'features.{i}.{j}.block', parts)
  top = f'features.{max(i for i, _ in blocks) + 1}'
  out += [('top_conv', s.conv(f'{top}.0')), ('top_bn', s.batch_norm(f'{top}.1'))]
  if 'classifier.1.weight' in state:
    out.append(('predictions', s.dense('classifier.1')))
  return out, s.unused()
