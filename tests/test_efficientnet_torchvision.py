"""torchvision's EfficientNetV2 S, M and L against torchvision (`torch.save` and
`.safetensors` files of random weights), every variant's parameters and BatchNorm
statistics through `jax.eval_shape`, sources, transforms, freezing, the frozen-BN rule and
stochastic depth.

Only efficientnet_v2_s_torchvision (the smallest) is built and run, at small sides; the
reference process (tests/torchvision_efficientnet_reference.py) runs once.
"""

import json
import re

import jax
import numpy as np
import pytest

from fineflax import config as config_lib, models, pytree, weights
from fineflax.models import efficientnet_v2, graph, heads, preprocessing
from fineflax.train import freeze, state as state_lib, summary
from fineflax.weights import torch_files
from fineflax.weights.assign import has_weights, layer_variables
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # builds torchvision models in a process of its own, trains

SIDES = (32, 64)  # every stride-2 convolution on an even side: where the paddings differ
# Float32 parity: max |fineflax - reference| <= TOLERANCE x max |reference|.
TOLERANCE = 1e-5
VARIANTS = ('s', 'm', 'l')
BACKBONE = 'efficientnet_v2_s_torchvision'


@pytest.fixture(scope='module')
def torch_refs(tmp_path_factory):
  """torchvision's files and outputs (tests/torchvision_efficientnet_reference.py)."""
  return helpers.torch_reference(tmp_path_factory, 'torchvision_efficientnet_reference')


@pytest.fixture(scope='module')
def shapes(torch_refs):
  return json.loads((torch_refs / 'shapes.json').read_text())


def _model(backbone=BACKBONE, include_top=False):
  return helpers.reference_model(backbone, include_top)


def _load(path, include_top, side=SIDES[0], backbone=BACKBONE):
  model, fn = _model(backbone, include_top)
  variables = state_lib.init_variables(model, (side, side, 3), seed=0)
  return *helpers.load_weights(model, backbone, path, include_top, variables), fn


def test_torchvision_parity_pth_and_safetensors(torch_refs):
  """torchvision's logits (its `classifier` as Keras' top) at two sides and its `features`
  output (the backbone's, under a new head), from both file types."""
  figures = {}
  for suffix in ('.pth', '.safetensors'):
    path = torch_refs / f'efficientnet_v2_s{suffix}'
    for include_top in (True, False):
      variables, report, fn = _load(path, include_top)  # for any side
      assert report.initialised == ([] if include_top else ['head/dense'])
      new_head = 'predictions: the model has a new head (config.model.include_top is False)'
      assert report.skipped == ([] if include_top else [new_head])
      for side in SIDES if include_top else SIDES[:1]:
        images = np.load(torch_refs / f'images{side}.npy')
        got = fn(variables, images) if include_top else fn(variables, images)[-1]
        kind = 'logits' if include_top else 'features'
        expected = np.load(torch_refs / f'{kind}{side}.npy')
        figures[suffix, include_top, side] = helpers.relative_difference(got, expected)
  print(f'torchvision: max relative difference {figures}')
  assert max(figures.values()) <= TOLERANCE


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_variant_has_torchvisions_parameters_and_statistics(shapes, variant):
  """Shapes only (`jax.eval_shape`): every torchvision parameter and BatchNorm statistic
  of the variant maps onto one of fineflax's of the same shape, fineflax has no other, and
  the top's dropout is torchvision's classifier's."""
  reference = shapes[variant]
  fake = {key: np.zeros(shape, np.float32) for key, shape in reference['state'].items()}
  layers, unused = torch_files.torch_efficientnet_v2_layers(fake)
  assert unused == []
  model, _ = _model(f'efficientnet_v2_{variant}_torchvision', True)
  variables = models.abstract_variables(model, (64, 64, 3))
  got = {
      pytree.path_str(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
  }
  kinds = {layer.name: layer for layer in model.backbone.layers + model.head.layers}
  expected = {}
  for name, arrays in layers:
    group = 'head' if name == 'predictions' else 'backbone'
    for collection, leaves in layer_variables(kinds[name], arrays).items():
      for key, value in leaves.items():
        expected[f'{collection}/{group}/{name}/{key}'] = value.shape
  assert got == expected
  assert model.head.layers[1].rate == reference['dropout']


def test_torchvision_sources_and_transforms_are_those_of_the_installed_torchvision(
    shapes, torch_refs
):
  """Each variant's only weights (IMAGENET1K_V1, the default): URL, sha256 prefix as torch
  hub checks it, top-1, no other checksum published; the include_top model's parameter
  count (BatchNorm statistics apart, as torch counts) is torchvision's; the input side is
  the weights' crop (and resize) size and the normalisation their mean and std."""
  published = json.loads((torch_refs / 'weights.json').read_text())
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  for variant, entry in published.items():
    backbone = f'efficientnet_v2_{variant}_torchvision'
    spec = models.BACKBONES[backbone]
    for tv in helpers.assert_torchvision_sources(backbone, entry).values():
      model, _ = _model(backbone, True)
      variables = models.abstract_variables(model, (32, 32, 3))
      assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params'])) == (
          tv['num_params']
      )
      t = tv['transforms']
      assert [spec.input_size] == t['crop_size'] == t['resize_size']
      normalised = (images / 255.0 - np.asarray(t['mean'])) / np.asarray(t['std'])
      np.testing.assert_allclose(
          preprocessing.preprocess(images, spec.preprocessing), normalised, rtol=1e-5, atol=1e-6
      )
  stats = [key for key in shapes['s']['state'] if key.endswith(('running_mean', 'running_var'))]
  variables = models.abstract_variables(_model(BACKBONE, True)[0], (32, 32, 3))
  assert len(jax.tree.leaves(variables['batch_stats'])) == len(stats)


def test_a_missing_file_is_one_line_offline_and_a_cached_impostor_is_refused(tmp_path, monkeypatch):
  helpers.assert_offline_error_then_impostor_refused(
      BACKBONE,
      'efficientnet_v2_s-dd5fe13b.pth',
      'sha256 prefix dd5fe13b',
      tmp_path / 'cache',
      monkeypatch,
  )


def test_weights_of_another_variant_are_refused(torch_refs):
  path = torch_refs / 'efficientnet_v2_s.safetensors'
  with pytest.raises(weights.WeightFileError) as error:
    _load(path, False, backbone='efficientnet_v2_m_torchvision')
  message = str(error.value)
  assert '\n' not in message
  assert f"{path} lacks 122 backbone layers, e.g. ['block1c_project_conv'," in message


def test_converted_checkpoint_and_init_from_load_the_same(torch_refs, tmp_path):
  """BatchNorm statistics (in 'batch_stats') travel with the parameters."""
  path = torch_refs / 'efficientnet_v2_s.pth'
  model, _ = _model()
  collections = ('params', 'batch_stats')
  direct, _ = helpers.assert_converted_and_init_from_load_the_same(
      model, BACKBONE, path, tmp_path, SIDES[0], collections
  )
  assert np.any(direct['batch_stats']['backbone']['top_bn']['var'] != 1)


def _feature(name):
  """The index in torchvision's `features` of an EfficientNetV2-S layer of fineflax."""
  if name.startswith(('stem_', 'top_')):
    return 0 if name.startswith('stem_') else 7
  return int(re.match(r'block(\d+)', name).group(1))


def _in_features(model, state, features):
  """The layers with weights of torchvision's `features.{i}` (i in `features`), and the
  parameters torch counts there."""
  layers = {
      layer.name
      for layer in model.backbone.layers[2:]  # the input layer, the identity rescaling
      if has_weights(layer) and _feature(layer.name) in features
  }
  count = sum(
      int(np.prod(shape))
      for key, shape in state.items()
      if re.match(r'features\.(\d+)\.', key)
      and int(key.split('.')[1]) in features
      and key.rsplit('.', 1)[1] in ('weight', 'bias')
  )
  return layers, count


def test_freezing_by_layers_regex_and_stages_is_by_torchvisions_modules(shapes):
  """Stages are torchvision's `features`: `stem` (features.0), `block1` .. `block6`
  (features.1 .. 6), `top` (features.7); `layers[:N]`, a regex and `stages[A:B]` freeze
  the modules torchvision has there, counted as torch counts their parameters (the
  BatchNorm statistics non-trainable whatever is frozen); `layer_decay` follows the
  stages."""
  state = shapes['s']['state']
  model, _ = _model()
  model = model.clone(head=graph.KerasGraph(heads.head_layers(10)))
  params = models.abstract_variables(model, (32, 32, 3))['params']
  frozen_by = lambda spec: helpers.frozen_layers(model, spec, params)
  stages = [s for s, _ in models.BACKBONES[BACKBONE].stages]
  assert stages == ['stem'] + [f'block{i}' for i in range(1, 7)] + ['top']
  total = sum(int(np.prod(s)) for k, s in state.items() if not re.search(r'running_|num_b', k))
  stats = sum(int(np.prod(s)) for k, s in state.items() if re.search(r'running_', k))
  total += 1280 * 10 + 10 - (1280 * 1000 + 1000)  # a new head of 10 for the classifier
  names = [layer.name for layer in model.backbone.layers]
  for block in (1, 4, 6):
    layers, count = _in_features(model, state, range(block))
    cut = next(i for i, name in enumerate(names) if name.startswith(f'block{block}a_'))
    got = summary.summarize(model, (32, 32, 3), f'layers[:{cut}]')
    assert (got.trainable, got.non_trainable) == (total - count, count + stats)
    assert frozen_by(f'layers[:{cut}]') == frozen_by(f'stages[:{block}]') == layers
  regex = frozen_by(r'regex:^backbone/(stem_|block[1-3])')
  assert regex == _in_features(model, state, range(4))[0]
  assert frozen_by('stages[:-1]') == _in_features(model, state, range(7))[0]
  multiplier = helpers.decay_multipliers(model, (32, 32, 3))
  assert multiplier('stem_conv') == {0.5**8}
  assert multiplier('block6o_se_expand') == {0.5**2}
  assert multiplier('top_bn') == {0.5}


def test_stochastic_depth_is_torchvisions_and_conv5_is_the_last_resolution(shapes):
  """drop_path 0.2 (torchvision's stochastic_depth_prob) gives each residual block
  torchvision's rate, per example ('row'), in a drop layer before its add (none where the
  rate is 0); the benchmark's 'conv5' mode trains from block6a, as in Keras' layout."""
  reference = shapes['s']['stochastic_depth']
  expected = [
      (f'block{n.split(".")[1]}{chr(97 + int(n.split(".")[2]))}_drop', p)
      for n, p, mode, residual in reference
      if residual and p > 0 and mode == 'row'
  ]
  cfg = config_lib.default_config()
  cfg.model.update(backbone=BACKBONE, drop_path=0.2)
  model = models.build_model(config_lib.validate(cfg).model, 10)
  ours = [(layer.name, layer.rate) for layer in model.backbone.layers if layer.per_example]
  assert [name for name, _ in ours] == [name for name, _ in expected] and len(ours) == 34
  assert [rate for _, rate in ours] == pytest.approx([rate for _, rate in expected], rel=1e-12)
  benchmark = scripts_loader.load('benchmark')
  layers = model.backbone.layers
  spec = benchmark.freeze_spec('conv5', layers)
  assert layers[int(spec[len('layers[:') : -1])].name == 'block6a_expand_conv'


def _mini(drop_path):
  """EfficientNetV2-S's torchvision layout up to block2b (two drop layers), a new head."""
  layers = efficientnet_v2.efficientnet_v2_layers('s', drop_path, 'torchvision')
  names = [layer.name for layer in layers]
  return models.Classifier(
      backbone=graph.KerasGraph(layers[: names.index('block2b_add') + 1]),
      head=graph.KerasGraph(heads.head_layers(4)),
      preprocessing='torch',
      stages=efficientnet_v2.v2_stages('s'),
  )


def test_a_step_keeps_batchnorm_statistics_and_drops_paths_the_same_on_one_and_eight_devices():
  """One step with the stem frozen: every BatchNorm statistic and the frozen parameters
  are unchanged bit for bit (BatchNorm in inference mode, trainable or not); drop paths act
  (the step's loss is not the inference loss) only in the blocks that train; 1 and 8
  devices give the same loss and parameters."""
  batch = helpers.labelled_batch(32)
  model = _mini(8.0)  # block1b: rate 8 / 40, block2b: 24 / 40
  variables = state_lib.init_variables(model, (32, 32, 3), seed=0)
  opt = helpers.phase_optimizer(
      model, variables['params'], 'stages[:1]', optimizer='sgd', learning_rate=0.1
  )
  assert freeze.stochastic_depth_layers(opt.labels, model.layer_groups()) == {
      'backbone/block1b_drop',
      'backbone/block2b_drop',
  }
  opt2 = helpers.phase_optimizer(model, variables['params'], 'stages[:2]')
  assert freeze.stochastic_depth_layers(opt2.labels, model.layer_groups()) == {
      'backbone/block2b_drop'
  }
  one, loss1 = helpers.step_on_one_and_all_devices(model, opt, variables, batch)
  helpers.assert_same_backbone(variables, {'batch_stats': one.batch_stats}, ('batch_stats',))
  stem = lambda params: {
      'params': {'backbone': {n: params['backbone'][n] for n in ('stem_conv', 'stem_bn')}}
  }
  helpers.assert_same_backbone(stem(variables['params']), stem(one.params))
  assert not np.array_equal(
      variables['params']['backbone']['block1a_project_conv']['kernel'],
      one.params['backbone']['block1a_project_conv']['kernel'],
  )
  inference = helpers.inference_loss(model, variables, batch)  # inference: no branch dropped
  assert abs(inference - loss1) > 1e-3 * abs(loss1)
