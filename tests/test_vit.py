"""The Vision Transformer against torchvision (`torch.save` and `.safetensors` files of
random weights), the position embedding resized as torchvision resizes it, every variant's
parameters through `jax.eval_shape`, sources, freezing, stochastic depth and dropout, and
the compiled cost.

Only vit_b_32_torchvision (the smallest) is built and run, at 96 and 160 px (3x3 and 5x5
patches); the reference process (tests/torchvision_vit_reference.py) runs once.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, models, pytree, weights
from fineflax.models import graph, heads, vit
from fineflax.train import freeze, state as state_lib, summary
from fineflax.weights import vit_files
from fineflax.weights.assign import layer_variables
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # builds torchvision models in a process of its own, trains

SIDES = (96, 160)  # the file's grid (3x3) and a resized one (5x5)
# Float32 parity: max |fineflax - reference| <= TOLERANCE x max |reference|.
TOLERANCE = 1e-5
VARIANTS = ('b_16', 'b_32', 'l_16', 'l_32')


@pytest.fixture(scope='module')
def torch_refs(tmp_path_factory):
  """torchvision's files and outputs (tests/torchvision_vit_reference.py)."""
  return helpers.torch_reference(tmp_path_factory, 'torchvision_vit_reference')


_APPLY = {}  # (backbone, include_top) -> (model, jitted function): one compile per side


def _model(backbone='vit_b_32_torchvision', include_top=False):
  if (backbone, include_top) not in _APPLY:
    cfg = config_lib.default_config()
    cfg.model.update(backbone=backbone, include_top=include_top)
    model = models.build_model(cfg.model, 1000 if include_top else 3)
    fn = jax.jit(model.apply if include_top else lambda v, x: model.apply(v, x, method='features'))
    _APPLY[backbone, include_top] = (model, fn)
  return _APPLY[backbone, include_top]


def _load(path, include_top, side, backbone='vit_b_32_torchvision'):
  model, fn = _model(backbone, include_top)
  variables = state_lib.init_variables(model, (side, side, 3), seed=0)
  return *helpers.load_weights(model, backbone, path, include_top, variables), fn


def test_torchvision_parity_pth_and_safetensors_at_the_files_grid_and_a_resized_one(torch_refs):
  """Logits (torchvision's `heads.head` as the top) and the class token's features, at the
  file's 2x2 grid and at 3x3, where the load resizes the position embedding as
  torchvision's `interpolate_embeddings` does and says so."""
  figures = {}
  for suffix in ('.pth', '.safetensors'):
    path = torch_refs / f'vit_b_32{suffix}'
    for include_top in (True, False):
      for side in SIDES:
        variables, report, fn = _load(path, include_top, side)
        assert report.initialised == ([] if include_top else ['head/dense'])
        resized = [line for line in report.adapted if 'encoder_pos_embedding' in line]
        assert resized == (
            []
            if side == SIDES[0]
            else [
                'backbone/encoder_pos_embedding: resized from a 3x3 to a 5x5 grid of patches '
                "(bicubic, corners aligned: torchvision's interpolate_embeddings)"
            ]
        )
        images = np.load(torch_refs / f'images{side}.npy')
        got = np.asarray(fn(variables, images))
        if include_top:
          expected = np.load(torch_refs / f'logits{side}.npy')
        else:
          expected = np.load(torch_refs / f'features{side}.npy')  # pooled: the class token
        figures[suffix, include_top, side] = helpers.relative_difference(got, expected)
  print(f'torchvision: max relative difference {figures}')
  assert max(figures.values()) <= TOLERANCE


def test_the_position_embedding_is_resized_as_torchvision_resizes_it(torch_refs):
  """Bicubic with torch's kernel (a = -0.75) and aligned corners, up and down, against
  the formula (the parity test compares with torchvision's `interpolate_embeddings`)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  state = safetensors.numpy.load_file(str(torch_refs / 'vit_b_32.safetensors'))
  embedding = state['encoder.pos_embedding']
  assert embedding.shape == (1, 10, 768)
  up = vit_files.resize_position_embedding(embedding, 26)
  np.testing.assert_array_equal(up[0, 0], embedding[0, 0])  # the class token's row is kept
  grid = up[0, 1:].reshape(5, 5, 768)
  old = embedding[0, 1:].reshape(3, 3, 768)
  # Aligned corners: every other new row and column is an old one.
  np.testing.assert_allclose(grid[::2, ::2], old, rtol=1e-6, atol=1e-7)
  # Between two old columns of an old row: torch's cubic weights at t = 0.5 (a = -0.75:
  # -3/32, 19/32, 19/32, -3/32) on the taps -1, 0, 1, 2, clamped at the border.
  w = (-3 / 32, 19 / 32, 19 / 32, -3 / 32)
  expected = (w[0] + w[1]) * old[0, 0] + w[2] * old[0, 1] + w[3] * old[0, 2]
  np.testing.assert_allclose(grid[0, 1], expected, rtol=1e-5, atol=1e-6)
  down = vit_files.resize_position_embedding(up, 10)
  np.testing.assert_allclose(down, embedding, rtol=1e-5, atol=1e-6)  # corners again
  with pytest.raises(ValueError, match='not a square grid'):
    vit_files.resize_position_embedding(embedding, 7)


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_variant_has_torchvisions_parameters(torch_refs, variant):
  """Shapes only (`jax.eval_shape` at 224): every torchvision parameter of the variant maps
  onto one of fineflax's of the same shape, and fineflax has no other."""
  reference = json.loads((torch_refs / 'shapes.json').read_text())[variant]['params']
  fake = {key: np.zeros(shape, np.float32) for key, shape in reference.items()}
  layers, unused = vit_files.torch_vit_layers(fake)
  assert unused == []
  spec = models.BACKBONES[f'vit_{variant}_torchvision']
  assert spec.input_size == 224
  model, _ = _model(f'vit_{variant}_torchvision', True)
  params = models.abstract_variables(model, (224, 224, 3))['params']
  flat = {
      pytree.path_str(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  expected = {}
  kinds = {layer.name: layer for layer in model.backbone.layers + model.head.layers}
  for name, arrays in layers:
    group = 'head' if name == 'heads_head' else 'backbone'
    names = layer_variables(kinds[name], arrays)['params']
    for key, value in names.items():
      expected[f'{group}/{name}/{key}'] = tuple(value.shape)
  assert flat == expected


def test_torchvision_sources_are_those_of_the_installed_torchvision(torch_refs):
  """Every weight enum of each variant: URL, sha256 prefix as torch hub checks it, top-1;
  the default; the parameter count torchvision publishes equals the include_top model's."""
  published = json.loads((torch_refs / 'weights.json').read_text())
  for variant, entry in published.items():
    backbone = f'vit_{variant}_torchvision'
    members = helpers.assert_torchvision_sources(backbone, entry)
    model, _ = _model(backbone, True)
    params = models.abstract_variables(model, (224, 224, 3))['params']
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    assert count == next(iter(members.values()))['num_params'], backbone


def test_weights_of_another_variant_are_refused_naming_the_first_mismatched_layer(torch_refs):
  with pytest.raises(weights.WeightFileError) as error:
    _load(torch_refs / 'vit_b_32.safetensors', False, 64, backbone='vit_b_16_torchvision')
  message = str(error.value)
  assert '\n' not in message
  assert (
      'backbone/conv_proj/kernel: the file has shape (32, 32, 3, 768), the model expects '
      '(16, 16, 3, 768)'
  ) in message


def test_freezing_by_layers_and_stages_counts_what_torch_counts(torch_refs):
  """`layers[:N]` up to a block's start freezes the patch embedding and the blocks before
  it: torchvision's parameter counts of those modules; `stages` are the patch embedding,
  each block, the final norm, and `layer_decay` follows them."""
  model, _ = _model()
  model = model.clone(head=graph.KerasGraph(heads.head_layers(10)))
  block = json.loads((torch_refs / 'shapes.json').read_text())['b_32']['block_params']
  side = 64
  embedding = 768 * 3 * 32 * 32 + 768 + 768 + 5 * 768  # conv_proj, class token, 2x2 + 1 rows
  total = embedding + 12 * block + 2 * 768 + 768 * 10 + 10
  names = [layer.name for layer in model.backbone.layers]
  for blocks in (0, 5, 12):
    cut = names.index(f'encoder_layer_{blocks}_ln_1') if blocks < 12 else names.index('encoder_ln')
    got = summary.summarize(model, (side, side, 3), f'layers[:{cut}]')
    frozen = embedding + blocks * block
    assert (got.trainable, got.non_trainable) == (total - frozen, frozen)
  stages = [s for s, _ in models.BACKBONES['vit_b_32_torchvision'].stages]
  assert stages == ['patch_embedding'] + [f'block{i}' for i in range(1, 13)] + ['final_norm']
  got = summary.summarize(model, (side, side, 3), 'stages[:-1]')
  assert got.non_trainable == embedding + 12 * block
  multiplier = helpers.decay_multipliers(model, (side, side, 3))
  assert multiplier('conv_proj') == multiplier('encoder_pos_embedding') == {0.5**14}
  assert multiplier('encoder_layer_11_mlp_3') == {0.5**2}
  assert multiplier('encoder_ln') == {0.5}


def test_drop_path_rates_and_the_branches_that_drop():
  """Rates rise linearly from 0 at the first block to drop_path at the last (timm,
  big_vision); both branches of a trainable block drop, none of a frozen one."""
  layers = vit.vit_layers('b_32', drop_path=0.2, depth=3)
  rates = [(layer.name, layer.rate) for layer in layers if layer.kind == 'StochasticDepth']
  assert rates == [
      ('encoder_layer_0_drop_path_1', 0.0),
      ('encoder_layer_0_drop_path_2', 0.0),
      ('encoder_layer_1_drop_path_1', 0.1),
      ('encoder_layer_1_drop_path_2', 0.1),
      ('encoder_layer_2_drop_path_1', 0.2),
      ('encoder_layer_2_drop_path_2', 0.2),
  ]
  model = _mini(0.2, 0.0)
  params = models.abstract_variables(model, (64, 64, 3))['params']
  opt = helpers.phase_optimizer(model, params, 'stages[:2]')  # embedding, block1 frozen
  assert freeze.stochastic_depth_layers(opt.labels, model.layer_groups()) == {
      f'backbone/encoder_layer_{i}_drop_path_{j}' for i in (1, 2) for j in (1, 2)
  }


def _mini(drop_path, dropout):
  """ViT-B/32's layout with 3 blocks, with a new head of 4."""
  return models.Classifier(
      backbone=vit.ViT('b_32', drop_path=drop_path, dropout=dropout, depth=3),
      head=graph.KerasGraph(heads.head_layers(4)),
      preprocessing='torch',
      stages=vit.stages('b_32')[:4] + vit.stages('b_32')[-1:],
  )


def test_drop_path_and_dropout_act_per_example_the_same_on_one_and_eight_devices():
  batch = helpers.labelled_batch(64)
  model = _mini(0.5, 0.1)
  variables = state_lib.init_variables(model, (64, 64, 3), seed=0)
  opt = helpers.phase_optimizer(model, variables['params'], 'none', optimizer='sgd')
  one, loss1 = helpers.step_on_one_and_all_devices(model, opt, variables, batch)
  inference = helpers.inference_loss(model, variables, batch)  # inference: nothing dropped
  assert abs(inference - loss1) > 1e-3 * abs(loss1)


def test_config_dropout_reaches_the_vit_and_is_refused_elsewhere():
  cfg = config_lib.default_config()
  cfg.model.update(backbone='vit_b_32_torchvision', dropout=0.1, drop_path=0.1)
  model = models.build_model(config_lib.validate(cfg).model, 10)
  rates = {layer.name: layer.rate for layer in model.backbone.layers}
  assert rates['encoder_dropout'] == rates['encoder_layer_3_mlp_2'] == 0.1
  assert rates['encoder_layer_11_drop_path_2'] == 0.1
  cfg.model.backbone = 'resnet50'
  cfg.model.drop_path = 0.0
  with pytest.raises(config_lib.ConfigError, match=r"backbone 'resnet50' has no dropout"):
    config_lib.validate(cfg)


def test_head_mode_costs_the_forward_pass_and_conv5_is_the_last_quarter():
  benchmark = scripts_loader.load('benchmark')
  records = {
      r['mode']: r
      for r in benchmark.cost_records(
          'vit_b_32_torchvision', ['head'], 8, 64, 'float32', devices=jax.devices()[:1]
      )
  }
  assert records['head']['x_forward'] <= 1.02
  layers = models.BACKBONES['vit_b_32_torchvision'].build().layers
  spec = benchmark.freeze_spec('conv5', layers)
  assert layers[int(spec[len('layers[:') : -1])].name == 'encoder_layer_9_ln_1'


def test_an_abstract_vit_b_16_runs_at_224_and_its_head_reads_the_class_token():
  model, _ = _model('vit_b_16_torchvision')
  out = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 224, 224, 3), jnp.uint8))
  )[0]
  assert out.shape == (2, 3)
