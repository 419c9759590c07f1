"""Freeze specs: what they freeze (checked against Keras), their errors, the optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, models
from fineflax.train import freeze, optimizers, summary
from tests import helpers


def _keras_counts(model):
  count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)
  return count(model.trainable_weights), count(model.non_trainable_weights)


def _model(backbone='resnet50', num_classes=10, **head):
  cfg = config_lib.default_config()
  cfg.model.backbone = backbone
  cfg.model.head.update(head)
  return models.build_model(cfg.model, num_classes)


def _abstract_params(model, size=32):
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return variables['params']


def test_layers_143_freezes_exactly_what_keras_freezes(keras):
  base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
  keras_frozen = {layer.name for layer in base.layers[:143] if layer.weights}
  model = _model()
  labels = freeze.freeze_labels(_abstract_params(model), 'layers[:143]', model.backbone.layers)
  frozen = {
      name
      for name, leaves in labels['backbone'].items()
      if freeze.FROZEN in jax.tree.leaves(leaves)
  }
  assert frozen == keras_frozen
  assert 'conv4_block6_3_conv' in frozen and 'conv5_block1_1_conv' not in frozen
  assert all(label == freeze.TRAINABLE for label in jax.tree.leaves(labels['head']))


def _seed000_keras(keras):
  base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3))
  for layer in base.layers[:143]:
    layer.trainable = False
  return keras.Sequential(
      [
          keras.Input((224, 224, 3)),
          base,
          keras.layers.GlobalAveragePooling2D(),
          keras.layers.Dropout(0.5),
          keras.layers.BatchNormalization(),
          keras.layers.Dense(1, activation='sigmoid'),
      ]
  )


def test_summary_counts_equal_keras_seed000(keras):
  """Seed 000: ResNet50 + GAP, Dropout, BN, Dense(1); layers[:143] frozen."""
  expected = _keras_counts(_seed000_keras(keras))
  # The figures the seed document printed from Keras.
  assert expected == (14_982_145, 8_615_808)
  model = _model(num_classes=1, dropout=0.5, batchnorm=True)
  got = summary.summarize(model, (224, 224, 3), 'layers[:143]')
  assert (got.trainable, got.non_trainable) == expected


@pytest.mark.parametrize(
    'spec, keras_freeze', [('layers[:143]', slice(0, 143)), ('backbone', slice(None))]
)
def test_summary_counts_equal_keras_seed004(keras, spec, keras_freeze):
  """Seed 004: ResNet50 (32x32, pooling avg) + Dense(10); base frozen, then conv5 unfrozen."""
  base = keras.applications.ResNet50(
      include_top=False, weights=None, pooling='avg', input_shape=(32, 32, 3)
  )
  for layer in base.layers[keras_freeze]:
    layer.trainable = False
  reference = keras.Sequential(
      [
          keras.Input((32, 32, 3)),
          base,
          keras.layers.Flatten(),
          keras.layers.Dense(10, activation='softmax'),
      ]
  )
  got = summary.summarize(_model(num_classes=10), (32, 32, 3), spec)
  assert (got.trainable, got.non_trainable) == _keras_counts(reference)
  if spec == 'layers[:143]':
    assert (got.trainable, got.non_trainable) == (14_996_490, 8_611_712)  # as in seed 004
  rows = {r.name: r for r in got.rows}
  assert rows['conv1_bn'].params == 256 and rows['conv1_bn'].trainable == 'N'
  assert rows['dense'].output_shape == (None, 10) and rows['dense'].trainable == 'Y'


@pytest.mark.slow  # builds three Keras applications
@pytest.mark.parametrize(
    'backbone, keras_name, size',
    [('resnet50', 'ResNet50', 32), ('vgg16', 'VGG16', 32), ('xception', 'Xception', 71)],
)
def test_stages_but_the_last_freeze_what_keras_freezes_before_the_last_block(
    keras, backbone, keras_name, size
):
  """'stages[:-1]' on each family equals the Keras freeze whose intent is "the last
  block trains": ResNet50's layers[:143] (conv5), VGG16's layers[:-4] (block5), Xception's
  layers before block13 (its exit flow); layers without weights aside."""
  keras.backend.clear_session()  # Keras numbers unnamed layers (conv2d_1) per session
  base = getattr(keras.applications, keras_name)(
      include_top=False, weights=None, input_shape=(size, size, 3)
  )
  names = [layer.name for layer in base.layers]
  if backbone == 'resnet50':
    cut = names.index('conv5_block1_1_conv')
  elif backbone == 'vgg16':
    cut = len(names) - 4
  else:
    cut = next(i for i, n in enumerate(names) if n.startswith('block13'))
  keras_frozen = {layer.name for layer in base.layers[:cut] if layer.weights}
  model = _model(backbone)
  labels = freeze.freeze_labels(
      _abstract_params(model, size), 'stages[:-1]', model.backbone.layers, model.layer_stages()
  )
  frozen = {
      name
      for name, leaves in labels['backbone'].items()
      if freeze.FROZEN in jax.tree.leaves(leaves)
  }
  trainable = {
      name
      for name, leaves in labels['backbone'].items()
      if freeze.TRAINABLE in jax.tree.leaves(leaves)
  }
  assert frozen == keras_frozen
  assert trainable == {layer.name for layer in base.layers[cut:] if layer.weights}
  assert all(label == freeze.TRAINABLE for label in jax.tree.leaves(labels['head']))


def test_stage_slices():
  model = _model('resnet_tiny')
  params, layers, stages = _abstract_params(model), model.backbone.layers, model.layer_stages()
  frozen_layers = lambda spec: {
      name
      for name, leaves in freeze.freeze_labels(params, spec, layers, stages)['backbone'].items()
      if freeze.FROZEN in jax.tree.leaves(leaves)
  }
  assert {n.split('_')[0] for n in frozen_layers('stages[:1]')} == {'conv1'}
  assert {n.split('_')[0] for n in frozen_layers('stages[1:3]')} == {'conv2', 'conv3'}
  assert {n.split('_')[0] for n in frozen_layers('stages[-2:-1]')} == {'conv4'}
  with pytest.raises(
      freeze.FreezeSpecError,
      match=r'index 6 is beyond the backbone, which '
      r"has 5 stages \(stages\[0\] = 'stem', stages\[4\] = 'conv5'\)",
  ):
    freeze.freeze_labels(params, 'stages[:6]', layers, stages)


def test_summary_table_lines():
  got = summary.summarize(_model('resnet_tiny', num_classes=3), (32, 32, 3), 'backbone')
  text = summary.format_summary(got, 'tiny')
  assert f'Total params: {got.total:,}' in text
  assert f'Trainable params: {got.trainable:,}' in text
  assert f'Non-trainable params: {got.non_trainable:,}' in text
  assert got.trainable == 512 * 3 + 3  # only the head's Dense trains


def test_regex_and_none_specs():
  model = _model('resnet_tiny')
  params = _abstract_params(model)
  labels = freeze.freeze_labels(
      params, r'regex:^backbone/conv[1-4]_.*/kernel$', model.backbone.layers
  )
  assert labels['backbone']['conv1_conv'] == {'kernel': 'frozen', 'bias': 'trainable'}
  assert labels['backbone']['conv5_block1_1_conv']['kernel'] == 'trainable'
  labels = freeze.freeze_labels(params, 'none', model.backbone.layers)
  assert set(jax.tree.leaves(labels)) == {freeze.TRAINABLE}


@pytest.mark.parametrize(
    'spec, message',
    [
        ('layers[:500]', 'index 500 is beyond the backbone, which has 55 layers'),
        ('layers[:1]', 'matches no parameter'),
        ('regex:^backbone/conv9', 'matches no parameter'),
        ('regex:.', 'freezes every parameter'),
        ('regex:(', 'bad regular expression'),
        ('layer[:3]', "expected 'none', 'backbone'"),
    ],
)
def test_bad_specs_are_refused(spec, message):
  model = _model('resnet_tiny')
  with pytest.raises(freeze.FreezeSpecError, match=message.replace('[', r'\[').replace('(', r'\(')):
    freeze.freeze_labels(_abstract_params(model), spec, model.backbone.layers)


def test_frozen_leaves_have_no_optimizer_state():
  model = _model('resnet_tiny')
  params = jax.tree.map(jnp.zeros_like, _abstract_params(model))
  opt = optimizers.make_optimizer(model, params, config_lib.phase(freeze='layers[:43]'), 1)
  labels = opt.labels
  opt_state = opt.init(params)
  n_trainable = sum(
      p.size
      for p, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels))
      if label == freeze.TRAINABLE
  )
  array_leaves = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
  assert sum(x.size for x in array_leaves) == 2 * n_trainable  # Adam's mu and nu only
  assert model.backbone.layers[43].name == 'conv5_block1_1_conv'


def test_bn_train_layers_follow_trainability():
  model = _model('resnet_tiny', batchnorm=True)
  labels = freeze.freeze_labels(_abstract_params(model), 'layers[:43]', model.backbone.layers)
  bn = freeze.bn_train_layers(labels, model.layer_groups())
  assert 'backbone/conv5_block1_1_bn' in bn and 'head/batch_normalization' in bn
  assert 'backbone/conv4_block1_1_bn' not in bn


def test_summary_of_the_imagenet_config_equals_seed004_keras_top():
  """Seed 004 printed Keras' ResNet50(include_top=True) summary: these three lines."""
  import sys  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(helpers.ROOT))
  from configs import imagenet  # pylint: disable=g-import-not-at-top

  got, _ = summary.summarize_config(imagenet.get_config())
  assert (got.total, got.trainable, got.non_trainable) == (25_636_712, 25_583_592, 53_120)
  rows = {r.name: r for r in got.rows}
  assert rows['predictions'].output_shape == (None, 1000)
  assert rows['conv5_block3_out'].output_shape == (None, 7, 7, 2048)


@pytest.mark.slow  # builds two Keras applications
@pytest.mark.parametrize(
    'backbone, keras_name', [('resnet50', 'ResNet50'), ('convnext_tiny', 'ConvNeXtTiny')]
)
def test_parameter_efficient_specs_train_what_keras_counts(keras, backbone, keras_name):
  """'norm' trains the scale and offset of every normalisation layer (Keras: gamma and beta
  of BatchNormalization / LayerNormalization), 'bias' every additive bias (Keras: every
  `bias` and `beta`), '+head' adds the new Dense head; the summary says so."""
  base = getattr(keras.applications, keras_name)(
      include_top=False, weights=None, input_shape=(32, 32, 3)
  )
  norms = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
  size = lambda w: int(np.prod(w.shape))
  norm = sum(
      size(w) for layer in base.layers if isinstance(layer, norms) for w in layer.trainable_weights
  )
  bias = sum(size(w) for w in base.trainable_weights if w.path.split('/')[-1] in ('bias', 'beta'))
  total = sum(size(w) for w in base.weights)
  head = 768 * 10 + 10 if backbone == 'convnext_tiny' else 2048 * 10 + 10
  model = _model(backbone)
  # The head's bias is a bias too.
  for spec, trained in (('norm', norm), ('bias', bias + 10), ('norm+head', norm + head)):
    got = summary.summarize(model, (32, 32, 3), spec)
    assert (got.trainable, got.non_trainable) == (trained, total + head - trained), spec
  assert bias > 0 and norm > 0


def test_a_parameter_efficient_spec_is_not_part_of_another():
  with pytest.raises(freeze.FreezeSpecError, match="'bias' says what trains"):
    freeze.spec_predicate('bias', _model().backbone.layers)
  for bad in ('norm+norm', 'norm+backbone', 'head+'):
    with pytest.raises(freeze.FreezeSpecError, match="or what trains: 'bias', 'norm', 'head'"):
      freeze.check_syntax(bad)
