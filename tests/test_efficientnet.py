"""EfficientNet and EfficientNetV2 against their references: Keras 3 (`.h5` through Keras'
legacy writer and its own `.weights.h5`) and tf_keras, on random weights each one writes;
Keras 3's extra input layer with its ImageNet weights; every variant's parameters through
`jax.eval_shape`; sources, freezing, stochastic depth and the compiled costs.

Only efficientnet_b0 and efficientnetv2_b0 are built and run, at small sides; each
reference model is built once.
"""

import contextlib
import dataclasses
import hashlib
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, models, pytree, weights
from fineflax.models import efficientnet, efficientnet_v2, graph, heads
from fineflax.train import freeze, state as state_lib, summary
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # builds Keras and tf_keras models, trains

SIDES = (32, 64)  # the two input sides of every parity check (Keras' smallest is 32)
# Float32 parity: max |fineflax - reference| <= TOLERANCE x max |reference| (seen here:
# 1e-7 to 1e-6).
TOLERANCE = 1e-5
FAMILIES = {  # fineflax backbone -> Keras application
    'efficientnet_b0': 'EfficientNetB0',
    'efficientnetv2_b0': 'EfficientNetV2B0',
}
V1 = tuple(efficientnet.VARIANTS)
V2 = tuple(efficientnet_v2.VARIANTS)


def _randomise(model, rng):
  """Every weight away from its initial value: kernels drawn as Keras' EfficientNet draws
  them (variance 2 / fan-out, normal), BatchNormalization's four arrays and the
  Normalization's statistics around their identities, in Keras 3 and tf_keras models."""
  for layer in model.layers:
    for w in layer.weights:
      path = getattr(w, 'path', w.name).split(':')[0]
      shape = tuple(w.shape)
      if path.endswith('kernel'):
        fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) == 4 else shape[-1]
        w.assign(rng.normal(0, np.sqrt(2 / fan_out), shape).astype(np.float32))
      elif path.endswith(('gamma', 'moving_variance')):
        w.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
      elif path.endswith(('beta', 'moving_mean', 'bias')):
        w.assign(rng.normal(0, 0.2, shape).astype(np.float32))
      elif path.endswith('normalization/mean'):
        w.assign(rng.uniform(0.4, 0.5, shape).astype(np.float32))
      elif path.endswith('normalization/variance'):
        w.assign(rng.uniform(0.04, 0.06, shape).astype(np.float32))
    if type(layer).__name__ == 'Normalization' and layer.weights:
      layer.finalize_state()  # its call reads the statistics as they were at build


@contextlib.contextmanager
def _zero_kernels():
  """Keras 3 builds EfficientNets with zero kernels (`_randomise` draws them): on JAX its
  truncated-normal initialiser compiles once per kernel shape, 20 s a model here."""
  from keras.src.applications import efficientnet as k1, efficientnet_v2 as k2  # pylint: disable=g-import-not-at-top

  with pytest.MonkeyPatch.context() as patch:
    for module in (k1, k2):
      patch.setattr(module, 'CONV_KERNEL_INITIALIZER', 'zeros')
      patch.setattr(module, 'DENSE_KERNEL_INITIALIZER', 'zeros')
    yield


def _save_h5(model, path):
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top

  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
  return path


@pytest.fixture(scope='module')
def keras_refs(keras, tmp_path_factory):
  """Per family: Keras 3's model, randomised, without the top and with it at each side
  (the same weights), each written by Keras' legacy writer (.h5) and its own
  (.weights.h5)."""
  folder = tmp_path_factory.mktemp('keras_efficientnet')
  refs = {}
  for backbone, application in FAMILIES.items():
    build = getattr(keras.applications, application)
    # A static input shape per side: Keras builds a (None, None, 3) model 20x slower.
    notops, tops = {}, {}
    for side in SIDES:
      with _zero_kernels():
        keras.backend.clear_session()  # Keras' automatic names: rescaling, normalization
        notops[side] = build(include_top=False, weights=None, input_shape=(side, side, 3))
        keras.backend.clear_session()
        tops[side] = build(weights=None, input_shape=(side, side, 3), classifier_activation=None)
    for models_ in (notops, tops):
      _randomise(models_[SIDES[0]], np.random.default_rng(len(refs)))
      models_[SIDES[1]].set_weights(models_[SIDES[0]].get_weights())
      _randomise(models_[SIDES[1]], np.random.default_rng(len(refs)))  # and finalize_state
    notop = notops[SIDES[0]]
    files = {}
    for include_top, model in ((False, notop), (True, tops[SIDES[0]])):
      files[include_top, 'h5'] = _save_h5(model, folder / f'{backbone}_{include_top}.h5')
      files[include_top, 'weights.h5'] = folder / f'{backbone}_{include_top}.weights.h5'
      model.save_weights(files[include_top, 'weights.h5'])
    refs[backbone] = {'notop': notop, 'notops': notops, 'tops': tops, 'files': files}
  return refs


_APPLY = {}  # (backbone, include_top, imagenet) -> (model, jitted function)
_INIT = {}  # (backbone, include_top) -> random variables (the same at any side)


def _model(backbone, include_top, weights_spec=None):
  key = (backbone, include_top, efficientnet.is_imagenet(weights_spec))
  if key not in _APPLY:
    cfg = config_lib.default_config()
    cfg.model.update(backbone=backbone, include_top=include_top, weights=weights_spec)
    model = models.build_model(cfg.model, 1000 if include_top else 3)
    if include_top:
      fn = jax.jit(model.apply)
    else:  # the backbone's output
      outputs = lambda v, x: model.apply(v, x, mutable=['intermediates'])[1]['intermediates']
      fn = jax.jit(lambda v, x: outputs(v, x)['backbone']['layer_outputs'][-1])
    _APPLY[key] = (model, fn)
  return _APPLY[key]


def _load(backbone, path, include_top, side=SIDES[0], weights_spec=None):
  model, fn = _model(backbone, include_top, weights_spec or str(path))
  cfg = config_lib.default_config()
  cfg.model.update(backbone=backbone, weights=weights_spec or str(path), include_top=include_top)
  if (backbone, include_top) not in _INIT:
    _INIT[backbone, include_top] = state_lib.init_variables(model, (side, side, 3), seed=0)
  variables, report = weights.load_pretrained(cfg.model, model, _INIT[backbone, include_top])
  return variables, report, fn


def _images(side, seed=3):
  return np.random.default_rng(seed).integers(0, 256, (2, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize('backbone', FAMILIES)
def test_layers_and_parameters_equal_keras(keras_refs, backbone):
  """Keras' layer names, kinds and order (the squeeze-excite Reshape and Multiply, the
  drop-connect Dropout and the Add are layers), Keras' parameter count per layer (the
  Normalization's statistics included), with and without the top."""
  notop, top = keras_refs[backbone]['notop'], keras_refs[backbone]['tops'][SIDES[0]]
  kinds = lambda layers: [(layer.name, type(layer).__name__) for layer in layers]
  model, _ = _model(backbone, False)
  assert [(layer.name, layer.kind) for layer in model.backbone.layers] == kinds(notop.layers)
  top_model, _ = _model(backbone, True)
  assert [
      (layer.name, layer.kind) for layer in top_model.backbone.layers + top_model.head.layers
  ] == kinds(top.layers)
  for layer, reference in zip(top_model.backbone.layers + top_model.head.layers, top.layers):
    if layer.kind == 'BatchNormalization':  # EfficientNetV2's 0.9, EfficientNet's default
      assert (layer.momentum or graph.BN_MOMENTUM, reference.epsilon) == (
          reference.momentum,
          1e-3,
      ), layer.name
    if layer.kind == 'Dropout' and not layer.per_example:  # the top's
      assert layer.rate == reference.rate == 0.2
  for m, reference in ((model, notop), (top_model, top)):
    variables = models.abstract_variables(m, (SIDES[0], SIDES[0], 3))
    for layer in reference.layers:
      group = 'head' if layer.name in ('predictions', 'top_dropout', 'avg_pool') else 'backbone'
      leaves = jax.tree.leaves(
          [variables[c].get(group, {}).get(layer.name, {}) for c in ('params', 'batch_stats')]
      )
      assert sum(int(np.prod(x.shape)) for x in leaves) == layer.count_params(), layer.name


def test_rescaling_equals_keras(keras):
  """Keras' Rescaling, one scale with an offset (EfficientNetV2-S/M/L's input) and one
  scale per channel (Keras 3's ImageNet rescaling of EfficientNet)."""
  from fineflax.models import layer_kinds  # pylint: disable=g-import-not-at-top

  x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
  for scale, offset in (((1 / 128,), -1.0), ((1.1, 2.2, 3.3), 0.0)):
    reference = keras.layers.Rescaling(scale if len(scale) > 1 else scale[0], offset)
    np.testing.assert_array_equal(
        np.asarray(layer_kinds.rescaling(jnp.asarray(x), scale, offset)),
        np.asarray(reference(x)),
    )
  layers = models.BACKBONES['efficientnetv2_s'].build().layers
  assert [(layer.kind, layer.scale, layer.offset) for layer in layers[1:3]] == [
      ('Rescaling', (1 / 128,), -1.0),
      ('Conv2D', (), 0.0),
  ]


def _scaling(keras_module, function):
  """The arguments a keras.applications EfficientNet(V2) function passes to the builder,
  recorded without building anything."""
  seen = {}
  builder = 'EfficientNetV2' if 'V2' in function else 'EfficientNet'
  original = getattr(keras_module, builder)
  setattr(keras_module, builder, lambda *args, **kwargs: seen.update(args=args, kwargs=kwargs))
  try:
    getattr(keras_module, function)(weights=None)
  finally:
    setattr(keras_module, builder, original)
  return seen['args'], seen['kwargs']


def _expected_shapes(blocks, stem, top, round_filters, repeats, v2):
  """The top-less backbone's parameter and statistic shapes from Keras' block arguments:
  `blocks` as (kernel, repeats, filters in, out, expand, se ratio, stride, fused)."""
  params, stats = {}, {}

  def bn(name, c):
    params.update({f'{name}/scale': (c,), f'{name}/bias': (c,)})
    stats.update({f'{name}/mean': (c,), f'{name}/var': (c,)})

  params['stem_conv/kernel'] = (3, 3, 3, stem)
  bn('stem_bn', stem)
  for i, (k, n, fin, fout, expand, se_ratio, _, fused) in enumerate(blocks):
    fin, fout = round_filters(fin), round_filters(fout)
    for j in range(repeats(n)):
      fin = fout if j else fin
      p, c = f'block{i + 1}{chr(j + 97)}_', fin * expand
      if expand != 1:
        params[f'{p}expand_conv/kernel'] = (k, k, fin, c) if fused else (1, 1, fin, c)
        bn(f'{p}expand_bn', c)
      if not fused:
        params[f'{p}dwconv{"2" if v2 else ""}/kernel'] = (k, k, 1, c)
        bn(f'{p}bn', c)
      if se_ratio:
        se = max(1, int(fin * se_ratio))
        params |= {
            f'{p}se_reduce/kernel': (1, 1, c, se),
            f'{p}se_reduce/bias': (se,),
            f'{p}se_expand/kernel': (1, 1, se, c),
            f'{p}se_expand/bias': (c,),
        }
      params[f'{p}project_conv/kernel'] = (
          (k, k, c, fout) if fused and expand == 1 else (1, 1, c, fout)
      )
      bn(f'{p}project_bn', fout)
  params['top_conv/kernel'] = (1, 1, fout, top)
  bn('top_bn', top)
  if not v2:
    stats |= {'normalization/mean': (3,), 'normalization/var': (3,), 'normalization/count': ()}
  return {'params': params, 'batch_stats': stats}


# keras.io's parameter counts of the include_top models (millions, as it rounds them).
KERAS_IO_PARAMS = {
    'efficientnet_b0': 5.3,
    'efficientnet_b1': 7.9,
    'efficientnet_b2': 9.2,
    'efficientnet_b3': 12.3,
    'efficientnet_b4': 19.5,
    'efficientnet_b5': 30.6,
    'efficientnet_b6': 43.3,
    'efficientnet_b7': 66.7,
    'efficientnetv2_b0': 7.2,
    'efficientnetv2_b1': 8.2,
    'efficientnetv2_b2': 10.2,
    'efficientnetv2_b3': 14.5,
    'efficientnetv2_s': 21.6,
    'efficientnetv2_m': 54.4,
    'efficientnetv2_l': 119.0,
}


@pytest.mark.parametrize(
    'backbone', [f'efficientnet_{v}' for v in V1] + [f'efficientnetv2_{v}' for v in V2]
)
def test_every_variant_has_the_parameters_of_keras_block_args(keras, backbone):
  """Shapes only (`jax.eval_shape`): no large variant is built. Keras' DEFAULT_BLOCKS_ARGS,
  the coefficients each keras.applications function passes and V2's own rounding functions
  give the shapes; keras.io's parameter count, the include_top model's total; Keras'
  default size, the input size."""
  import math  # pylint: disable=g-import-not-at-top

  from keras.src.applications import efficientnet as k1, efficientnet_v2 as k2  # pylint: disable=g-import-not-at-top

  v2 = backbone.startswith('efficientnetv2')
  variant = backbone.split('_')[1]
  if v2:
    _, kw = _scaling(k2, f'EfficientNetV2{variant.upper()}')
    width, depth, size = kw['width_coefficient'], kw['depth_coefficient'], kw['default_size']
    blocks = [
        tuple(a[k] for k in ('kernel_size', 'num_repeat', 'input_filters', 'output_filters',
                             'expand_ratio', 'se_ratio', 'strides', 'conv_type'))
        for a in k2.DEFAULT_BLOCKS_ARGS[kw['name']]
    ]  # fmt: skip
    rf = lambda f: k2.round_filters(f, width, 8, 8)
    rr = lambda n: k2.round_repeats(n, depth)
  else:
    (width, depth, size, _), _ = _scaling(k1, f'EfficientNet{variant.upper()}')
    blocks = [
        (a['kernel_size'], a['repeats'], a['filters_in'], a['filters_out'], a['expand_ratio'],
         a['se_ratio'], a['strides'], 0)
        for a in k1.DEFAULT_BLOCKS_ARGS
    ]  # fmt: skip

    def rf(filters):  # EfficientNet's inner `round_filters` (a closure in Keras)
      filters *= width
      new = max(8, int(filters + 4) // 8 * 8)
      return int(new + 8 if new < 0.9 * filters else new)

    rr = lambda n: int(math.ceil(depth * n))
  expected = _expected_shapes(blocks, rf(blocks[0][2]), rf(1280), rf, rr, v2)
  spec = models.BACKBONES[backbone]
  assert spec.input_size == size
  tree = jax.eval_shape(spec.build().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for collection in ('params', 'batch_stats'):
    got = {
        pytree.path_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree[collection])[0]
    }
    assert got == expected[collection], collection
  top = models.BACKBONES[backbone].top(1000)[-1]  # Keras' predictions layer
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)) + rf(1280) * 1000 + 1000
  assert (top.name, top.filters) == ('predictions', 1000)
  assert round(total / 1e6, 1) == KERAS_IO_PARAMS[backbone]


def _keras_parity(refs, backbone, fmt, include_top):
  path = refs['files'][include_top, fmt]
  figures = []
  for side in SIDES:
    variables, report, fn = _load(backbone, path, include_top, side)
    images = _images(side)
    reference = refs['tops' if include_top else 'notops'][side]
    expected = np.asarray(reference(images.astype(np.float32)))
    got = np.asarray(fn(variables, images))
    assert report.num_loaded == reference.count_params()
    assert report.skipped == [] and report.initialised == ([] if include_top else ['head/dense'])
    figures.append(helpers.relative_difference(got, expected))
  return figures


@pytest.mark.parametrize('fmt', ['h5', 'weights.h5'])
@pytest.mark.parametrize('include_top', [False, True])
@pytest.mark.parametrize('backbone', FAMILIES)
def test_keras_parity(keras_refs, backbone, fmt, include_top):
  """Keras' [0, 255] input (its Rescaling and Normalization inside), every layer kind,
  Keras' top: the backbone's output (top-less) or the logits, at two sides."""
  figures = _keras_parity(keras_refs[backbone], backbone, fmt, include_top)
  print(f'{backbone} keras {fmt} include_top={include_top}: max relative difference {figures}')
  assert max(figures) <= TOLERANCE


@pytest.mark.parametrize('backbone', FAMILIES)
def test_tf_keras_parity(backbone, tmp_path):
  """tf_keras' model (its legacy .h5 holds the weighted layers in Keras 3's order; its
  EfficientNet never has Keras 3's ImageNet rescaling)."""
  import tf_keras  # pylint: disable=g-import-not-at-top

  reference = getattr(tf_keras.applications, FAMILIES[backbone])(
      include_top=False, weights=None, input_shape=(None, None, 3)
  )
  _randomise(reference, np.random.default_rng(4))
  path = tmp_path / f'tf_keras_{backbone}_notop.h5'
  reference.save_weights(str(path))
  figures = []
  for side in SIDES:
    variables, report, fn = _load(backbone, path, False, side)
    assert report.num_loaded == reference.count_params()
    images = _images(side)
    expected = np.asarray(reference(images.astype(np.float32), training=False))
    figures.append(helpers.relative_difference(np.asarray(fn(variables, images)), expected))
  print(f'{backbone} tf_keras .h5: max relative difference {figures}')
  assert max(figures) <= TOLERANCE


def _as_keras_imagenet(monkeypatch, tmp_path, backbone, path, include_top=False):
  """`path` in $FINEFLAX_CACHE as the `keras:imagenet` file of `backbone`, its md5 the
  source's."""
  monkeypatch.setenv('FINEFLAX_CACHE', str(tmp_path / 'cache'))
  source = weights.named_source('imagenet', backbone)
  file = source.file(include_top)
  (tmp_path / 'cache' / 'weights').mkdir(parents=True)
  shutil.copy(path, tmp_path / 'cache' / 'weights' / file.filename)
  md5 = hashlib.md5(path.read_bytes()).hexdigest()
  ours = dataclasses.replace(
      source, **{'full' if include_top else 'notop': dataclasses.replace(file, md5=md5)}
  )
  monkeypatch.setattr(
      weights.sources, 'SOURCES', tuple(ours if s is source else s for s in weights.SOURCES)
  )


def test_keras_imagenet_weights_add_keras_3s_rescaling_and_a_path_does_not(
    keras, keras_refs, monkeypatch, tmp_path
):
  """Keras 3 divides by sqrt(ImageNet's standard deviations) once more (`rescaling_1`)
  with `weights='imagenet'`, not with the same file as a path: `keras:imagenet` ('imagenet')
  builds that model (its layers and outputs), a path, None and V2 do not."""
  from keras.src.applications import efficientnet as keras_efficientnet  # pylint: disable=g-import-not-at-top

  path = keras_refs['efficientnet_b0']['files'][False, 'h5']
  monkeypatch.setattr(keras_efficientnet.file_utils, 'get_file', lambda *a, **k: str(path))
  keras.backend.clear_session()
  with _zero_kernels():
    reference = keras.applications.EfficientNetB0(
        include_top=False, weights='imagenet', input_shape=(SIDES[0], SIDES[0], 3)
    )
  names = [layer.name for layer in reference.layers]
  assert names[:5] == ['input_layer', 'rescaling', 'normalization', 'rescaling_1', 'stem_conv_pad']
  _as_keras_imagenet(monkeypatch, tmp_path, 'efficientnet_b0', path)
  for spec in ('imagenet', 'keras:imagenet'):
    model, _ = _model('efficientnet_b0', False, spec)
    assert [layer.name for layer in model.backbone.layers] == names
  for spec in (None, str(path)):
    model, _ = _model('efficientnet_b0', False, spec)
    assert [layer.name for layer in model.backbone.layers] == names[:3] + names[4:]
  assert 'rescaling_1' not in [
      layer.name for layer in _model('efficientnetv2_b0', False, 'imagenet')[0].backbone.layers
  ]
  side = SIDES[0]
  variables, report, fn = _load('efficientnet_b0', path, False, side, 'keras:imagenet')
  assert report.num_loaded == reference.count_params()
  images = _images(side)
  expected = np.asarray(reference(images.astype(np.float32)))
  figure = helpers.relative_difference(np.asarray(fn(variables, images)), expected)
  # The layer matters: the stem's output of the same file without it (Keras' from a path).
  stem = lambda m: keras.Model(m.inputs, m.get_layer('stem_conv').output)(images.astype(np.float32))
  unscaled = helpers.relative_difference(
      np.asarray(stem(keras_refs['efficientnet_b0']['notop'])), np.asarray(stem(reference))
  )
  print(f'keras:imagenet: max relative difference {figure} (without rescaling_1: {unscaled})')
  assert figure <= TOLERANCE and unscaled > 0.1


def test_keras_sources_are_those_of_the_installed_keras():
  """URLs and the md5 `file_hash`es keras.applications.efficientnet(_v2) download and
  check, with and without the top; each file named after the Keras model."""
  import inspect  # pylint: disable=g-import-not-at-top

  from keras.src.applications import efficientnet as k1, efficientnet_v2 as k2  # pylint: disable=g-import-not-at-top

  for module, variants, prefix, keras_name in (
      (k1, V1, 'efficientnet_', lambda v: f'efficientnet{v}'),
      (k2, V2, 'efficientnetv2_', lambda v: f'efficientnetv2-{v}'),
  ):
    text = inspect.getsource(module)
    assert 'file_name = name + file_suffix' in text and 'BASE_WEIGHTS_PATH + file_name' in text
    for variant in variants:
      source = weights.named_source('imagenet', prefix + variant)
      assert source.name == 'keras:imagenet'
      assert f'name="{keras_name(variant)}"' in text
      full, notop = module.WEIGHTS_HASHES[variant if variant.startswith('b') else f'-{variant}']
      base = module.BASE_WEIGHTS_PATH + keras_name(variant)
      assert (source.full.url, source.full.md5) == (f'{base}.h5', full)
      assert (source.notop.url, source.notop.md5) == (f'{base}_notop.h5', notop)
      assert source.full.sha256 is None and source.full.sha256_prefix is None
      assert f'keras/src/applications/{module.__name__.rsplit(".", 1)[1]}.py' in (
          source.checksum_source
      )
      assert source.licence == 'Apache-2.0 (ported from tensorflow/tpu)'


def test_a_missing_file_is_one_line_offline_and_a_cached_impostor_is_refused(tmp_path, monkeypatch):
  helpers.assert_offline_error_then_impostor_refused(
      'efficientnetv2_b0',
      'efficientnetv2-b0_notop.h5',
      'md5 893217f2bb855e2983157299931e43ff',
      tmp_path / 'cache',
      monkeypatch,
  )


def test_weights_of_another_variant_are_refused_naming_the_first_mismatched_layer(keras, tmp_path):
  keras.backend.clear_session()
  with _zero_kernels():
    b1 = keras.applications.EfficientNetB1(include_top=False, weights=None, input_shape=(32, 32, 3))
  path = _save_h5(b1, tmp_path / 'efficientnet_b1_notop.h5')
  with pytest.raises(weights.WeightFileError) as error:
    _load('efficientnet_b0', path, False)
  message = str(error.value)
  assert '\n' not in message
  # Matched by order, B1's second block 1 (block1b) meets B0's block2a.
  assert (
      f'{path}: params backbone/block2a_expand_conv/kernel: the file has shape (3, 3, 16, 1), '
      "the model expects (1, 1, 16, 96) (file layer 'block1b_dwconv')"
  ) in message


def test_zero_shot_predict_matches_keras(keras_refs, tmp_path):
  side = SIDES[-1]
  refs = keras_refs['efficientnetv2_b0']
  helpers.assert_zero_shot_matches_keras(
      'efficientnetv2_b0', refs['files'][True, 'h5'], refs['tops'][side], side, tmp_path
  )


def test_converted_checkpoint_and_init_from_load_the_same(keras_refs, tmp_path):
  """The Normalization's statistics (in 'batch_stats' only) travel too."""
  model, _ = _model('efficientnet_b0', False)
  path = keras_refs['efficientnet_b0']['files'][False, 'h5']
  direct, report = helpers.assert_converted_and_init_from_load_the_same(
      model, 'efficientnet_b0', path, tmp_path, SIDES[0], ('params', 'batch_stats')
  )
  assert 'backbone/normalization' in report.loaded
  np.testing.assert_array_equal(
      direct['batch_stats']['backbone']['normalization']['var'],
      np.asarray(keras_refs['efficientnet_b0']['notop'].get_layer('normalization').weights[1]),
  )


@pytest.mark.parametrize(
    'backbone, cut', [('efficientnet_b0', 5), ('efficientnet_b0', 120), ('efficientnetv2_b0', 200)]
)
def test_freezing_layers_counts_what_keras_counts(keras, keras_refs, backbone, cut):
  """`layers[:N]` freezes Keras' `base_model.layers[:N]`; the summary's trainable and
  non-trainable counts equal Keras' for the base + GAP + Dense(10) (the Normalization's
  statistics non-trainable whatever is frozen)."""
  base = keras_refs[backbone]['notop']
  try:
    for layer in base.layers[:cut]:
      layer.trainable = False
    reference = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            base,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )
    count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)
    expected = (count(reference.trainable_weights), count(reference.non_trainable_weights))
    frozen = {layer.name for layer in base.layers[:cut] if layer.trainable_weights or (
        layer.weights and type(layer).__name__ != 'Normalization')}  # fmt: skip
  finally:
    for layer in base.layers:
      layer.trainable = True
  model, _ = _model(backbone, False)
  model = model.clone(head=graph.KerasGraph(heads.head_layers(10)))
  got = summary.summarize(model, (32, 32, 3), f'layers[:{cut}]')
  assert (got.trainable, got.non_trainable) == expected
  assert helpers.frozen_layers(model, f'layers[:{cut}]') == frozen


def test_stages_are_the_stem_the_block_groups_and_the_top():
  model, _ = _model('efficientnet_b0', False)
  stages = model.layer_stages()
  assert [s for s, _ in models.BACKBONES['efficientnet_b0'].stages] == (
      ['stem'] + [f'block{i}' for i in range(1, 8)] + ['top']
  )
  assert stages['normalization'] == (0, 'stem') and stages['stem_activation'] == (0, 'stem')
  assert stages['block1a_dwconv'] == (1, 'block1')
  assert stages['block6d_add'] == (6, 'block6')
  assert stages['top_conv'] == stages['top_activation'] == (8, 'top')
  names = [layer.name for layer in model.backbone.layers]
  cut = names.index('top_conv')
  assert helpers.frozen_layers(model, 'stages[:-1]') == helpers.frozen_layers(
      model, f'layers[:{cut}]'
  )
  assert [s for s, _ in models.BACKBONES['efficientnetv2_m'].stages][-2:] == ['block7', 'top']
  assert [s for s, _ in models.BACKBONES['efficientnetv2_s'].stages][-2:] == ['block6', 'top']
  multiplier = helpers.decay_multipliers(model, (32, 32, 3))
  assert multiplier('stem_conv') == {0.5**9}
  assert multiplier('block7a_project_bn') == {0.5**2}
  assert multiplier('top_bn') == {0.5}


@pytest.mark.parametrize('backbone', FAMILIES)
def test_drop_connect_layers_and_rates_are_keras(keras_refs, backbone):
  """Keras' default model (drop_connect_rate 0.2) has its drop layers (noise shape
  (None, 1, 1, 1)) where fineflax has them, at the rates fineflax gives drop_path 0.2;
  drop_path 0 keeps the layers, as identities."""
  v2 = backbone.startswith('efficientnetv2')
  layers = (
      efficientnet_v2.efficientnet_v2_layers('b0', 0.2)
      if v2
      else efficientnet.efficientnet_layers('b0', 0.2)
  )
  reference = keras_refs[backbone]['notop']
  keras_drops = [
      (layer.name, layer.rate, tuple(layer.noise_shape))
      for layer in reference.layers
      if type(layer).__name__ == 'Dropout'
  ]
  ours = [(layer.name, layer.rate, (None, 1, 1, 1)) for layer in layers if layer.per_example]
  assert ours == keras_drops and len(ours) == (15 if v2 else 9)
  idle = models.BACKBONES[backbone].build().layers
  assert [layer.name for layer in idle if layer.per_example] == [name for name, *_ in ours]
  assert {layer.rate for layer in idle if layer.per_example} == {0.0}
  # EfficientNetV2-S's first block is residual, at rate 0: Keras gives it no drop layer.
  names = [layer.name for layer in models.BACKBONES['efficientnetv2_s'].build().layers]
  assert 'block1a_add' in names and 'block1a_drop' not in names and 'block1b_drop' in names


def _mini(drop_path):
  """EfficientNetB0's first layers, up to block3b (two drop layers), with a new head."""
  layers = efficientnet.efficientnet_layers('b0', drop_path)
  names = [layer.name for layer in layers]
  return models.Classifier(
      backbone=graph.KerasGraph(layers[: names.index('block3b_add') + 1]),
      head=graph.KerasGraph(heads.head_layers(4)),
      preprocessing='raw',
      stages=efficientnet.stages(),
  )


def test_drop_connect_acts_in_the_blocks_that_train_the_same_on_one_and_eight_devices():
  """The drop layers drop whole examples, drawn from each example's index in the global
  batch: one step on 1 and on 8 devices gives the same loss and parameters; they act (the
  step's loss is not the inference loss) and only in blocks that train (`stages[:3]`
  frozen: the stem, block1 and block2)."""
  batch = helpers.labelled_batch(32)
  model = _mini(1.0)  # block2b: rate 2/16, block3b: 4/16
  variables = state_lib.init_variables(model, (32, 32, 3), seed=0)
  # Depthwise kernels of unit gain (Glorot's, over 9 x channels outputs, fade the signal
  # out): a dropped branch must make a difference.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: np.full_like(x, 1 / 3)
      if pytree.path_str(path).endswith('dwconv/kernel')
      else x,
      variables,
  )
  opt = helpers.phase_optimizer(
      model, variables['params'], 'stages[:3]', optimizer='sgd', learning_rate=0.1
  )
  assert freeze.stochastic_depth_layers(opt.labels, model.layer_groups()) == {
      'backbone/block3b_drop'
  }
  opt = helpers.phase_optimizer(
      model, variables['params'], 'stages[:2]', optimizer='sgd', learning_rate=0.1
  )
  assert freeze.stochastic_depth_layers(opt.labels, model.layer_groups()) == {
      'backbone/block2b_drop',
      'backbone/block3b_drop',
  }
  one, loss1 = helpers.step_on_one_and_all_devices(model, opt, variables, batch)
  inference = helpers.inference_loss(model, variables, batch)  # inference: no branch dropped
  assert abs(inference - loss1) > 1e-5 * abs(loss1)  # float noise: 1e-7


def test_a_drop_path_is_accepted_by_efficientnet():
  cfg = config_lib.default_config()
  cfg.model.update(backbone='efficientnetv2_s', drop_path=0.2)
  assert config_lib.validate(cfg).model.drop_path == 0.2


def test_head_mode_costs_the_forward_pass_and_conv5_is_the_last_resolution():
  """Frozen costs nothing (XLA's FLOPs of the compiled steps); the benchmark's 'conv5' mode
  trains from block6a, where the last resolution begins, as ResNet's conv5 does."""
  benchmark = scripts_loader.load('benchmark')
  records = {
      r['mode']: r
      for r in benchmark.cost_records(
          'efficientnet_b0', ['head'], 8, 32, 'float32', devices=jax.devices()[:1]
      )
  }
  assert records['head']['x_forward'] <= 1.02
  for backbone in ('efficientnet_b0', 'efficientnetv2_b0', 'efficientnetv2_l'):
    layers = models.BACKBONES[backbone].build().layers
    spec = benchmark.freeze_spec('conv5', layers)
    assert layers[int(spec[len('layers[:') : -1])].name == 'block6a_expand_conv'
