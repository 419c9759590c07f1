"""ConvNeXt against its references: Keras 3 (`.h5` through Keras' legacy writer and its own
`.weights.h5`), tf_keras and torchvision (`torch.save` and `.safetensors`), on random weights
each one writes; every variant's parameters through `jax.eval_shape`; sources, freezing,
stochastic depth, zero-shot prediction and the compiled costs.

Only convnext_tiny is built and run, at small sides; each reference model is built once.
"""

import json

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, models, pytree, weights
from fineflax.models import convnext, graph, heads, layer_kinds
from fineflax.train import freeze, state as state_lib, summary
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # builds Keras, tf_keras and torchvision models, trains

SIDES = (32, 64)  # the two input sides of every parity check (ConvNeXt's smallest is 32)
# Float32 parity: max |fineflax - reference| <= TOLERANCE x max |reference| (seen here:
# 7e-7 to 1.4e-6).
TOLERANCE = 1e-5
VARIANTS = ('tiny', 'small', 'base', 'large', 'xlarge')


def _randomise(model, rng):
  """Layer scales (1e-6 at init: the blocks would not show) and LayerNorm scales and
  offsets away from their initial values, in Keras 3 and tf_keras models alike."""
  for w in model.weights:
    path = getattr(w, 'path', w.name)
    if 'layer_scale' in path or 'gamma' in path:
      w.assign(rng.uniform(0.5, 1.5, tuple(w.shape)).astype(np.float32))
    elif 'beta' in path:
      w.assign(rng.normal(0, 0.1, tuple(w.shape)).astype(np.float32))


@pytest.fixture(scope='module')
def keras_refs(keras, tmp_path_factory):
  """Keras 3 ConvNeXtTiny, randomised: without the top (any side), with it at each side
  (the same weights), and each written by Keras' legacy writer (.h5) and its own
  (.weights.h5)."""
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top

  folder = tmp_path_factory.mktemp('keras_convnext')
  keras.backend.clear_session()  # the automatically named layer_normalization, input_layer
  notop = keras.applications.ConvNeXtTiny(
      include_top=False, weights=None, input_shape=(None, None, 3)
  )
  _randomise(notop, np.random.default_rng(0))
  tops = {
      side: keras.applications.ConvNeXtTiny(
          weights=None, input_shape=(side, side, 3), classifier_activation=None
      )
      for side in SIDES
  }
  _randomise(tops[SIDES[0]], np.random.default_rng(1))
  for side in SIDES[1:]:
    tops[side].set_weights(tops[SIDES[0]].get_weights())
  files = {}
  for include_top, model in ((False, notop), (True, tops[SIDES[0]])):
    files[include_top, 'h5'] = folder / f'convnext_tiny_{include_top}.h5'
    with h5py.File(files[include_top, 'h5'], 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
    files[include_top, 'weights.h5'] = folder / f'convnext_tiny_{include_top}.weights.h5'
    model.save_weights(files[include_top, 'weights.h5'])
  return {'notop': notop, 'tops': tops, 'files': files}


@pytest.fixture(scope='module')
def torch_refs(tmp_path_factory):
  """torchvision's files and outputs (tests/torchvision_convnext_reference.py)."""
  return helpers.torch_reference(tmp_path_factory, 'torchvision_convnext_reference')


_INIT = {}  # (backbone, include_top) -> random variables (the same at any side)
_model = helpers.reference_model  # the logits, or every backbone layer's output


def _load(backbone, path, include_top, side=SIDES[0]):
  model, fn = _model(backbone, include_top)
  cfg = config_lib.default_config()
  cfg.model.update(backbone=backbone, weights=str(path), include_top=include_top)
  if (backbone, include_top) not in _INIT:
    _INIT[backbone, include_top] = state_lib.init_variables(model, (side, side, 3), seed=0)
  variables, report = weights.load_pretrained(cfg.model, model, _INIT[backbone, include_top])
  return variables, report, fn


def _images(side, seed=3):
  return np.random.default_rng(seed).integers(0, 256, (2, side, side, 3), dtype=np.uint8)


def test_layers_and_parameters_equal_keras(keras_refs):
  """Keras' layer names, kinds and order (the stem and downsampling blocks are nested
  Sequential layers; Keras 3 lists no layer for a block's add), Keras' parameter count per
  layer, with and without the top."""
  notop, top = keras_refs['notop'], keras_refs['tops'][SIDES[0]]
  backbone = models.BACKBONES['convnext_tiny'].build()
  kinds = lambda layers: [(layer.name, type(layer).__name__) for layer in layers]
  assert [(layer.name, layer.kind) for layer in backbone.layers] == kinds(notop.layers)
  assert len(backbone.layers) == 133 and backbone.layers[-1].name == 'layer_normalization'
  for layer, reference in zip(backbone.layers, notop.layers):
    assert [s.name for s in layer.sublayers] == [s.name for s in getattr(reference, 'layers', [])]
  model, _ = _model('convnext_tiny', True)
  # (The top models' input layers are input_layer_1, ...: Keras numbers them per session.)
  assert [(layer.name, layer.kind) for layer in model.backbone.layers + model.head.layers][1:] == (
      kinds(top.layers)[1:]
  )
  for m, reference in ((_model('convnext_tiny', False)[0], notop), (model, top)):
    variables = models.abstract_variables(m, (SIDES[0], SIDES[0], 3))
    for layer in reference.layers:
      group = 'backbone' if layer.name in variables['params']['backbone'] else 'head'
      leaves = jax.tree.leaves(variables['params'][group].get(layer.name, {}))
      assert sum(int(np.prod(x.shape)) for x in leaves) == layer.count_params(), layer.name


def _expected_shapes(depths, dims, p):
  """The top-less backbone's parameter shapes, from Keras' MODEL_CONFIGS and the
  architecture (the paper's Figure / Keras' ConvNeXtBlock)."""
  out = {
      f'{p}_stem/{p}_stem_conv/kernel': (4, 4, 3, dims[0]),
      f'{p}_stem/{p}_stem_conv/bias': (dims[0],),
      f'{p}_stem/{p}_stem_layernorm/scale': (dims[0],),
      f'{p}_stem/{p}_stem_layernorm/bias': (dims[0],),
      'layer_normalization/scale': (dims[-1],),
      'layer_normalization/bias': (dims[-1],),
  }
  for i, (depth, c) in enumerate(zip(depths, dims)):
    if i:
      d = f'{p}_downsampling_block_{i - 1}'
      out[f'{d}/{p}_downsampling_layernorm_{i - 1}/scale'] = (dims[i - 1],)
      out[f'{d}/{p}_downsampling_layernorm_{i - 1}/bias'] = (dims[i - 1],)
      out[f'{d}/{p}_downsampling_conv_{i - 1}/kernel'] = (2, 2, dims[i - 1], c)
      out[f'{d}/{p}_downsampling_conv_{i - 1}/bias'] = (c,)
    for j in range(depth):
      b = f'{p}_stage_{i}_block_{j}'
      out |= {
          f'{b}_depthwise_conv/kernel': (7, 7, 1, c),
          f'{b}_depthwise_conv/bias': (c,),
          f'{b}_layernorm/scale': (c,),
          f'{b}_layernorm/bias': (c,),
          f'{b}_pointwise_conv_1/kernel': (c, 4 * c),
          f'{b}_pointwise_conv_1/bias': (4 * c,),
          f'{b}_pointwise_conv_2/kernel': (4 * c, c),
          f'{b}_pointwise_conv_2/bias': (c,),
          f'{b}_layer_scale/gamma': (c,),
      }
  return out


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_variant_has_the_parameters_of_its_depths_and_widths(variant):
  """Shapes only (`jax.eval_shape`): no large variant is built. Keras' MODEL_CONFIGS give
  the depths and widths; torchvision's layout has the same parameters."""
  from keras.src.applications.convnext import MODEL_CONFIGS  # pylint: disable=g-import-not-at-top

  depths, dims = MODEL_CONFIGS[variant]['depths'], MODEL_CONFIGS[variant]['projection_dims']
  expected = _expected_shapes(depths, dims, f'convnext_{variant}')
  names = [f'convnext_{variant}'] + (
      [f'convnext_{variant}_torchvision'] if variant != 'xlarge' else []
  )
  for name in names:
    spec = models.BACKBONES[name]
    assert spec.input_size == MODEL_CONFIGS[variant]['default_size'] == 224
    params = jax.eval_shape(
        spec.build().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32)
    )['params']
    got = {
        pytree.path_str(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert got == expected, name


def _keras_parity(keras_refs, fmt, include_top):
  path = keras_refs['files'][include_top, fmt]
  figures = []
  for side in SIDES:
    variables, report, fn = _load('convnext_tiny', path, include_top, side)
    images = _images(side)
    if include_top:
      reference = keras_refs['tops'][side]
      expected, got = np.asarray(reference(images.astype(np.float32))), np.asarray(
          fn(variables, images)
      )
    else:
      reference = keras_refs['notop']
      expected = np.asarray(reference(images.astype(np.float32)))
      got = np.asarray(fn(variables, images)[-1])
    assert report.num_loaded == reference.count_params()
    assert report.skipped == [] and report.initialised == ([] if include_top else ['head/dense'])
    figures.append(helpers.relative_difference(got, expected))
  return figures


@pytest.mark.parametrize('fmt', ['h5', 'weights.h5'])
@pytest.mark.parametrize('include_top', [False, True])
def test_keras_parity(keras_refs, fmt, include_top):
  """Keras' raw-pixel input (its Normalization layer inside), every layer kind, Keras'
  top: the backbone's output (top-less) or the logits, at two sides."""
  figures = _keras_parity(keras_refs, fmt, include_top)
  print(f'keras {fmt} include_top={include_top}: max relative difference {figures}')
  assert max(figures) <= TOLERANCE


def test_tf_keras_parity(tmp_path):
  """tf_keras' ConvNeXtTiny (its graph lists the residual adds as layers of their own; its
  legacy .h5 holds the weighted layers in the same order)."""
  import tf_keras  # pylint: disable=g-import-not-at-top

  reference = tf_keras.applications.ConvNeXtTiny(
      include_top=False, weights=None, input_shape=(None, None, 3)
  )
  _randomise(reference, np.random.default_rng(4))
  path = tmp_path / 'tf_keras_convnext_tiny_notop.h5'
  reference.save_weights(str(path))
  figures = []
  for side in SIDES:
    variables, report, fn = _load('convnext_tiny', path, False, side)
    assert report.num_loaded == reference.count_params()
    images = _images(side)
    expected = np.asarray(reference(images.astype(np.float32), training=False))
    figures.append(helpers.relative_difference(np.asarray(fn(variables, images)[-1]), expected))
  print(f'tf_keras .h5: max relative difference {figures}')
  assert max(figures) <= TOLERANCE


def test_torchvision_parity_pth_and_safetensors(torch_refs):
  """torchvision's logits (Keras' top mapped from `classifier`) at two sides and `features`
  output (the backbone before its last, top-less LayerNorm), from both file types."""
  figures = {}
  for suffix in ('.pth', '.safetensors'):
    path = torch_refs / f'convnext_tiny{suffix}'
    for include_top in (True, False):
      for side in SIDES if include_top else SIDES[:1]:
        variables, report, fn = _load('convnext_tiny_torchvision', path, include_top, side)
        assert report.initialised == ([] if include_top else ['head/dense'])
        assert report.skipped == (
            []
            if include_top
            else [
                'convnext_tiny_head_dense: the model has a new head (config.model.include_top '
                'is False)'
            ]
        )
        images = np.load(torch_refs / f'images{side}.npy')
        if include_top:
          got, expected = fn(variables, images), np.load(torch_refs / f'logits{side}.npy')
        else:
          got, expected = fn(variables, images)[-2], np.load(torch_refs / f'features{side}.npy')
        figures[suffix, include_top, side] = helpers.relative_difference(np.asarray(got), expected)
  print(f'torchvision: max relative difference {figures}')
  assert max(figures.values()) <= TOLERANCE


def test_torchvision_sources_are_those_of_the_installed_torchvision(torch_refs):
  """Each variant's only weights (IMAGENET1K_V1, the default): URL, sha256 prefix as torch
  hub checks it, top-1, no other checksum published; and the parameter count torchvision
  publishes equals the include_top model's (shapes only)."""
  published = json.loads((torch_refs / 'weights.json').read_text())
  for variant, entry in published.items():
    backbone = f'convnext_{variant}_torchvision'
    for tv in helpers.assert_torchvision_sources(backbone, entry).values():
      model, _ = _model(backbone, True)
      variables = models.abstract_variables(model, (32, 32, 3))
      assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables)) == tv['num_params']


def test_keras_sources_are_those_of_the_installed_keras():
  """URLs and the sha256 `file_hash`es keras.applications.convnext downloads and checks."""
  from keras.src.applications import convnext as keras_convnext  # pylint: disable=g-import-not-at-top

  for variant in VARIANTS:
    name = f'convnext_{variant}'
    source = weights.named_source('imagenet', name)
    assert source.name == 'keras:imagenet'
    full, notop = keras_convnext.WEIGHTS_HASHES[name]
    base = keras_convnext.BASE_WEIGHTS_PATH
    assert (source.full.url, source.full.sha256) == (f'{base}{name}.h5', full)
    assert (source.notop.url, source.notop.sha256) == (f'{base}{name}_notop.h5', notop)
    assert source.full.md5 is None and source.full.sha256_prefix is None
    assert 'keras/src/applications/convnext.py' in source.checksum_source


def test_a_missing_file_is_one_line_offline_and_a_cached_impostor_is_refused(tmp_path, monkeypatch):
  helpers.assert_offline_error_then_impostor_refused(
      'convnext_tiny',
      'convnext_tiny_notop.h5',
      'sha256 d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1',
      tmp_path / 'cache',
      monkeypatch,
  )


def test_weights_of_another_variant_are_refused_naming_the_first_mismatched_layer(keras, tmp_path):
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top

  small = keras.applications.ConvNeXtSmall(include_top=False, weights=None, input_shape=(32, 32, 3))
  path = tmp_path / 'convnext_small_notop.h5'
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, small)
  with pytest.raises(weights.WeightFileError) as error:
    _load('convnext_tiny', path, False)
  message = str(error.value)
  assert '\n' not in message
  # Matched by order, the 9 blocks of tiny's stage 3 fit; its downsampling block does not.
  assert (
      f'{path}: backbone/convnext_tiny_downsampling_block_2: the file has 2 arrays of shapes '
      '[(7, 7, 1, 384), (384,)], the model expects 4 of shapes [(384,), (384,), (2, 2, 384, 768), '
      "(768,)] (file layer 'convnext_small_stage_2_block_9_depthwise_conv')"
  ) in message


def test_zero_shot_predict_matches_keras(keras_refs, tmp_path):
  side = SIDES[-1]
  refs = keras_refs
  helpers.assert_zero_shot_matches_keras(
      'convnext_tiny', refs['files'][True, 'h5'], refs['tops'][side], side, tmp_path
  )


def test_converted_checkpoint_and_init_from_load_the_same(keras_refs, tmp_path):
  model, _ = _model('convnext_tiny', False)
  path = keras_refs['files'][False, 'h5']
  helpers.assert_converted_and_init_from_load_the_same(
      model, 'convnext_tiny', path, tmp_path, SIDES[0]
  )


@pytest.mark.parametrize('cut', [3, 60, 118])
def test_freezing_layers_counts_what_keras_counts(keras, keras_refs, cut):
  """`layers[:N]` freezes Keras' `base_model.layers[:N]` (a Sequential whole); the summary's
  trainable and non-trainable counts equal Keras' for the base + GAP + Dense(10)."""
  base = keras_refs['notop']
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
    frozen = {layer.name for layer in base.layers[:cut] if layer.weights}
  finally:
    for layer in base.layers:
      layer.trainable = True
  model, _ = _model('convnext_tiny', False)
  model = model.clone(head=graph.KerasGraph(heads.head_layers(10)))
  got = summary.summarize(model, (32, 32, 3), f'layers[:{cut}]')
  assert (got.trainable, got.non_trainable) == expected
  assert helpers.frozen_layers(model, f'layers[:{cut}]') == frozen


def test_stages_are_the_stem_and_four_stages_each_opened_by_its_downsampling():
  model, _ = _model('convnext_tiny', False)
  stages = model.layer_stages()
  assert [s for s, _ in models.BACKBONES['convnext_tiny'].stages] == [
      'stem',
      'stage1',
      'stage2',
      'stage3',
      'stage4',
  ]
  assert stages['convnext_tiny_stem'] == (0, 'stem')
  assert stages['convnext_tiny_stage_0_block_2_identity'] == (1, 'stage1')
  assert stages['convnext_tiny_downsampling_block_0'] == (2, 'stage2')
  assert stages['convnext_tiny_stage_2_block_8_layer_scale'] == (3, 'stage3')
  assert stages['convnext_tiny_downsampling_block_2'] == (4, 'stage4')
  assert stages['layer_normalization'] == (4, 'stage4')
  names = [layer.name for layer in model.backbone.layers]
  cut = names.index('convnext_tiny_downsampling_block_2')
  weighted = {layer.name for layer in model.backbone.layers[:cut] if layer.kind != 'Activation'}
  assert helpers.frozen_layers(model, 'stages[:-1]') == weighted - {'input_layer', names[1]}
  assert helpers.frozen_layers(model, 'stages[:-1]') == helpers.frozen_layers(
      model, f'layers[:{cut}]'
  )
  multiplier = helpers.decay_multipliers(model, (32, 32, 3))
  assert multiplier('convnext_tiny_stem') == {0.5**5}
  assert multiplier('convnext_tiny_downsampling_block_0') == {0.5**3}
  assert multiplier('layer_normalization') == {0.5}


def test_stochastic_depth_layers_and_rates_are_keras(keras):
  """With a drop-path rate, Keras names a block's last layer `_stochastic_depth` (but the
  first block's, whose rate is 0) at rates rising linearly to it."""
  from keras.src.applications.convnext import MODEL_CONFIGS, ConvNeXt  # pylint: disable=g-import-not-at-top

  keras.backend.clear_session()
  reference = ConvNeXt(
      depths=MODEL_CONFIGS['tiny']['depths'],
      projection_dims=MODEL_CONFIGS['tiny']['projection_dims'],
      drop_path_rate=0.3,
      name='convnext_tiny',
      include_top=False,
      weights=None,
      input_shape=(32, 32, 3),
  )
  layers = convnext.convnext_layers('tiny', drop_path=0.3)
  assert [(layer.name, layer.kind) for layer in layers] == [
      (layer.name, type(layer).__name__) for layer in reference.layers
  ]
  rates = [(layer.name, layer.rate) for layer in layers if layer.kind == 'StochasticDepth']
  assert rates == [
      (layer.name, layer.drop_path_rate)
      for layer in reference.layers
      if type(layer).__name__ == 'StochasticDepth'
  ]
  assert len(rates) == 17 and rates[-1][1] == 0.3


def test_stochastic_depth_drops_whole_examples_from_their_own_keys():
  """Keras' StochasticDepth: a row is 0 or x / (1 - rate); here each row's draw is a
  function of its own key alone (so the batch's split over devices cannot change it)."""
  module = graph.KerasGraph(layers=())
  x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (4000, 2, 2, 3)), jnp.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(7), i))(jnp.arange(4000))
  y = np.asarray(layer_kinds.stochastic_depth(module, x, 0.25, keys, 5))
  kept = np.all(y != 0, axis=(1, 2, 3))
  assert np.all(y[~kept] == 0)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / np.float32(0.75), rtol=2.5e-7)
  assert abs(kept.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)
  half = np.asarray(layer_kinds.stochastic_depth(module, x[2000:], 0.25, keys[2000:], 5))
  np.testing.assert_array_equal(half, y[2000:])


def _mini(drop_path):
  """ConvNeXt's layout, a block a stage of 8 channels, with a new head of 4."""
  backbone = convnext.ConvNeXt('tiny', drop_path=drop_path, depths=(1, 1, 1, 1), widths=(8,) * 4)
  return models.Classifier(
      backbone=backbone,
      head=graph.KerasGraph(heads.head_layers(4)),
      preprocessing='raw',
      stages=convnext.stages('tiny'),
  )


def test_drop_path_acts_in_the_blocks_that_train_the_same_on_one_and_eight_devices():
  """Stochastic depth is drawn per example from its index in the global batch: one step
  on 1 and on 8 devices gives the same loss and parameters; it acts (the step's loss is
  not the inference loss) and only in blocks that train (`stages[:2]` frozen: the stem
  and stage1, whose block has rate 0 anyway)."""
  batch = helpers.labelled_batch(32)
  model = _mini(0.5)
  variables = state_lib.init_variables(model, (32, 32, 3), seed=0)
  # Layer scales of 1, not 1e-6: a dropped branch must make a difference.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if pytree.path_str(path).endswith('/gamma') else x,
      variables,
  )
  opt = helpers.phase_optimizer(
      model, variables['params'], 'stages[:2]', optimizer='sgd', learning_rate=0.1
  )
  assert freeze.stochastic_depth_layers(opt.labels, model.layer_groups()) == {
      f'backbone/convnext_tiny_stage_{s}_block_0_stochastic_depth' for s in (1, 2, 3)
  }
  one, loss1 = helpers.step_on_one_and_all_devices(model, opt, variables, batch)
  inference = helpers.inference_loss(model, variables, batch)  # inference: no branch dropped
  assert abs(inference - loss1) > 1e-3 * abs(loss1)


def test_a_drop_path_for_a_backbone_without_stochastic_depth_is_refused():
  cfg = config_lib.default_config()
  cfg.model.drop_path = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"backbone 'resnet50' has no stochastic depth"):
    config_lib.validate(cfg)
  cfg.model.backbone = 'convnext_tiny'
  assert config_lib.validate(cfg).model.drop_path == 0.1


def test_head_mode_costs_the_forward_pass_and_conv5_is_the_last_stage():
  """Frozen costs nothing (XLA's FLOPs of the compiled steps); the benchmark's 'conv5' mode
  trains ConvNeXt's last stage."""
  benchmark = scripts_loader.load('benchmark')
  records = {
      r['mode']: r
      for r in benchmark.cost_records(
          'convnext_tiny', ['head'], 8, 32, 'float32', devices=jax.devices()[:1]
      )
  }
  assert records['head']['x_forward'] <= 1.02
  layers = models.BACKBONES['convnext_tiny'].build().layers
  spec = benchmark.freeze_spec('conv5', layers)
  assert layers[int(spec[len('layers[:') : -1])].name == 'convnext_tiny_downsampling_block_2'
