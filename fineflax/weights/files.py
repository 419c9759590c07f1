"""Readers of weight files into one form: a list of (Keras layer name, arrays in Keras'
weight order), e.g. ('conv1_bn', [gamma, beta, moving_mean, moving_variance]).

fineflax: an Orbax checkpoint directory of the variables tree (scripts/convert_weights.py).
Keras: the legacy weights-only HDF5 layout of `keras.applications` files (`layer_names`
and `weight_names` attributes), with or without the top, and Keras 3's own `.weights.h5`
(`model.save_weights`: each layer's variables under a `vars` group named after it).
torch: `.pth` / `.pt` state dicts (needs PyTorch) and `.safetensors` files (needs only
`safetensors`) of the torchvision / timm ResNet50 and torchvision's ConvNeXt,
EfficientNetV2 and ViT, whose names are mapped onto fineflax's layer names by
fineflax.weights.torch_files and vit_files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fineflax import storage
from fineflax.errors import DataError
from fineflax.models.graph import Layer
from fineflax.pytree import overlay
from fineflax.weights import torch_files, vit_files
from fineflax.weights.torch_files import FileLayers

SUFFIXES = ('.h5', '.pth', '.pt', '.safetensors')


class WeightFileError(DataError):
  """A weight file that cannot be read or does not fit the model."""


def _text(x) -> str:
  return x.decode('utf8') if isinstance(x, bytes) else str(x)


def read_keras_h5(path: str | os.PathLike) -> FileLayers:
  """The layers with weights of a Keras legacy HDF5 weights file, in file order."""
  import h5py  # pylint: disable=g-import-not-at-top

  try:
    f = h5py.File(path, 'r')
  except OSError as e:
    raise WeightFileError(f'{path}: not a readable HDF5 file ({e})') from None
  with f:
    group = f['model_weights'] if 'layer_names' not in f.attrs and 'model_weights' in f else f
    if 'layer_names' not in group.attrs:
      raise WeightFileError(
          f"{path}: not a Keras legacy weights file (no 'layer_names' attribute); fineflax "
          'reads the HDF5 layout of keras.applications files'
      )
    out = []
    for name in (_text(n) for n in group.attrs['layer_names']):
      layer = group[name]
      weight_names = [_text(w) for w in layer.attrs.get('weight_names', [])]
      if weight_names:
        out.append((name, [np.asarray(layer[w]) for w in weight_names]))
    return out


def is_keras3_weights(path: str | os.PathLike) -> bool:
  """Whether an HDF5 file is in Keras 3's `.weights.h5` layout (a `layers` group, no
  legacy `layer_names`)."""
  import h5py  # pylint: disable=g-import-not-at-top

  try:
    with h5py.File(path, 'r') as f:
      return 'layers' in f and 'layer_names' not in f.attrs and 'model_weights' not in f
  except OSError:
    return False  # read_keras_h5 says what is wrong with it


def read_keras3_weights(
    path: str | os.PathLike, layer_groups: Mapping[str, Sequence[Layer]]
) -> FileLayers:
  """The layers with weights of a Keras 3 `.weights.h5` file, by the layer names Keras
  records on each `vars` group, wherever the layer sits (a base model nested in another
  model too). A Sequential layer of the model takes its layers' arrays, in its order."""
  import h5py  # pylint: disable=g-import-not-at-top

  found: dict[str, list[np.ndarray]] = {}

  def visit(name: str, obj: Any) -> None:
    if isinstance(obj, h5py.Group) and name.rsplit('/', 1)[-1] == 'vars' and len(obj):
      if 'name' not in obj.attrs:
        raise WeightFileError(
            f'{path}: {name} has no layer name (written by a Keras 3 older than the one '
            'that records them); save the weights with a newer Keras, or as .h5 through '
            "Keras' legacy writer"
        )
      found[_text(obj.attrs['name'])] = [np.asarray(obj[str(i)]) for i in range(len(obj))]

  with h5py.File(path, 'r') as f:
    f.visititems(visit)
  for layers in layer_groups.values():
    for layer in layers:
      if layer.kind == 'Sequential' and layer.name not in found:
        parts = [found.pop(sub.name) for sub in layer.sublayers if sub.name in found]
        if parts:
          found[layer.name] = [a for part in parts for a in part]
  return list(found.items())


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torch state dict as float32 numpy arrays (`.safetensors`, `.pth`, `.pt`)."""
  path = Path(path)
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

    try:
      tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError
      raise WeightFileError(f'{path}: not a readable safetensors file ({e})') from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightFileError(
        f'{path}: reading .pth / .pt files needs PyTorch (pip install torch); '
        'a .safetensors copy of the file needs only the safetensors '
        'package'
    ) from None
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises pickle and zip errors alike
    raise WeightFileError(f'{path}: not a readable torch file ({e})') from None
  for key in ('state_dict', 'model'):  # training checkpoints wrap the state dict
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, 'detach')}


def read_variable_tree(path: str | os.PathLike, ema: bool = False) -> dict[str, Any]:
  """{'params', 'batch_stats'} of an Orbax PyTree folder of fineflax variables: a
  checkpoint's `<step>/state`, or what `scripts/convert_weights.py` writes. The arrays come
  to this process's first device whatever mesh they were saved from; an optimizer state
  and step saved beside them are not read. The one reader of saved variables: `load_run`,
  `init_from` and `config.model.weights` all read through it.

  `ema`: the parameters with the leaves of the checkpoint's moving average in their place
  (a run with config.ema); WeightFileError where it holds none.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = storage.absolute(path, 'checkpoint folder')  # a local path or gs://
  # The item's handler, not a Checkpointer: that one also looks for the step's metadata
  # file in this item folder and logs a warning that it is not there.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path)
    tree = getattr(tree, 'tree', tree)
    wanted = {k: tree[k] for k in ('params', 'batch_stats') if tree.get(k)}
    if ema and not (tree.get('ema') or {}).get('params'):
      raise WeightFileError(
          f'{path}: this checkpoint holds no moving average of the weights (the run had '
          'no config.ema.decay); use its raw weights'
      )
    if ema:
      wanted['ema'] = {k: v for k, v in tree['ema'].items() if k in ('params', 'batch_stats')}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), wanted)
    restored = handler.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
  except WeightFileError:
    raise
  except Exception as e:  # Orbax raises a variety of errors for a foreign directory
    raise WeightFileError(f'{path}: not a readable Orbax checkpoint ({e})') from None
  finally:
    handler.close()
  out = {k: restored.get(k, {}) for k in ('params', 'batch_stats')}
  for k, average in (restored.get('ema') or {}).items():
    out[k] = overlay(out[k], average)
  return out


def variable_tree_layers(
    tree: Mapping[str, Any], layer_groups: Mapping[str, Sequence[Layer]], source: str
) -> tuple[FileLayers, list[str]]:
  """The layers of a tree of fineflax variables ({'params': {group: {layer: ...}},
  'batch_stats': ...}) in Keras weight order, and the head layers the model has no place
  for.

  Backbone layers the model lacks come back with no arrays, so that loading them fails as
  a file of another backbone.
  """
  params, stats = tree.get('params', {}), tree.get('batch_stats', {})
  known = {(g, layer.name): layer for g, layers in layer_groups.items() for layer in layers}
  out, unused = [], []
  # Layers with parameters, then those with statistics only (EfficientNet's Normalization).
  for group in dict.fromkeys([*params, *stats]):
    for name in dict.fromkeys([*params.get(group, {}), *stats.get(group, {})]):
      p = params.get(group, {}).get(name, {})
      layer = known.get((group, name))
      if layer is None:
        if group == 'backbone':
          out.append((name, []))
        else:
          unused.append(f'{group}/{name}')
        continue
      try:
        arrays = keras_arrays(layer, p, stats.get(group, {}).get(name, {}))
      except KeyError as e:
        raise WeightFileError(f'{source}: {group}/{name} lacks {e}') from None
      out.append((name, [np.asarray(a) for a in arrays]))
  return out, unused


# The parameters of the kinds whose arrays are stored as the model holds them, in the
# file's order (the Vision Transformer's kinds: fineflax.weights.vit_files' order).
PARAMETER_NAMES = {
    'LayerNormalization': ('scale', 'bias'),
    'LayerScale': ('gamma',),
    'ClassToken': ('token',),
    'PositionEmbedding': ('embedding',),
    'MultiHeadAttention': ('in_kernel', 'in_bias', 'out_kernel', 'out_bias'),
}


def keras_arrays(layer: Layer, p: Mapping[str, Any], s: Mapping[str, Any]) -> list[Any]:
  """A layer's fineflax variables (params `p`, statistics `s`) in Keras' weight order."""
  kind = layer.kind
  if kind == 'Sequential':
    return [
        a
        for sub in layer.sublayers
        if sub.name in p
        for a in keras_arrays(sub, p[sub.name], s.get(sub.name, {}))
    ]
  if kind == 'BatchNormalization':
    return [p['scale'], p['bias'], s['mean'], s['var']]
  if kind in PARAMETER_NAMES:
    return [p[name] for name in PARAMETER_NAMES[kind]]
  if kind == 'Normalization':  # EfficientNet's stored statistics
    return [s['mean'], s['var'], s['count']]
  if kind == 'SeparableConv2D':
    arrays = [p['depthwise_kernel'].transpose(0, 1, 3, 2), p['pointwise_kernel']]
  elif kind == 'DepthwiseConv2D':
    arrays = [p['kernel'].transpose(0, 1, 3, 2)]
  else:
    arrays = [p['kernel']]
  return arrays + ([p['bias']] if 'bias' in p else [])


def _torch_layers(
    state: dict[str, np.ndarray], backbone: Sequence[Layer]
) -> tuple[FileLayers, list[str]]:
  """The layers of a torch state dict, by the family its names show."""
  if torch_files.is_torch_efficientnet(state):
    return torch_files.torch_efficientnet_v2_layers(state)
  if torch_files.is_torch_convnext(state):
    return torch_files.torch_convnext_layers(state, backbone)
  if vit_files.is_torch_vit(state):
    return vit_files.torch_vit_layers(state)
  return torch_files.torch_resnet_layers(state)


def read_weight_file(
    path: str | os.PathLike, layer_groups: Mapping[str, Sequence[Layer]]
) -> tuple[FileLayers, list[str], bool]:
  """(layers, keys that were not used, whether layers must be matched by order).

  Keras' legacy files are matched by order, as Keras itself loads them (the names of
  Keras' automatically named layers depend on the session that saved the file); Keras 3
  `.weights.h5` files, torch files and fineflax checkpoints by name.
  """
  path = Path(path)
  if path.is_dir():
    layers, unused = variable_tree_layers(read_variable_tree(path), layer_groups, str(path))
    return layers, unused, False
  if not path.is_file():
    raise WeightFileError(f'weight file {path} does not exist')
  if path.suffix == '.h5' and is_keras3_weights(path):
    return read_keras3_weights(path, layer_groups), [], False
  if path.suffix == '.h5':
    return read_keras_h5(path), [], True
  if path.suffix in SUFFIXES:
    state = read_state_dict(path)
    try:
      layers, unused = _torch_layers(state, layer_groups.get('backbone', ()))
    except KeyError as e:
      raise WeightFileError(f'{path}: {e.args[0]} is missing') from None
    if not layers:
      raise WeightFileError(
          f'{path}: no torchvision / timm ResNet or torchvision ConvNeXt / EfficientNetV2 / ViT '
          f'parameters in it (keys such as {list(state)[:3]})'
      )
    return layers, unused, False
  raise WeightFileError(
      f'{path}: unknown weight file type {path.suffix!r}; expected one of ' f'{list(SUFFIXES)}'
  )
