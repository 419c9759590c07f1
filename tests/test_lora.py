"""LoRA adapters (fineflax.models.lora): the adapted model against the base model with
W + (alpha / r) * A @ B computed in NumPy, the merge load_run applies, the freeze rules,
the summary's trainable count, loading weights, and a short run that resumes bitwise."""

import jax
import numpy as np
import pytest

from fineflax import config as config_lib, models, train, weights
from fineflax.errors import ConfigError
from fineflax.pytree import path_str
from fineflax.run import RunDir, checkpoints, restore
from fineflax.train import freeze, state as state_lib, summary
from tests import helpers, scripts_loader

RANK, ALPHA = 2, 6.0  # scale 3: a wrong scale anywhere shows
SHAPE = (16, 16, 3)
CONV_KINDS = ('Conv2D', 'Dense')


def _model_config(rank=RANK, **lora_keys):
  cfg = helpers.tiny_config()
  cfg.model.lora.rank = rank
  cfg.model.lora.alpha = ALPHA
  for key, value in lora_keys.items():
    cfg.model.lora[key] = value
  return cfg.model


@pytest.fixture(scope='module')
def models_and_variables():
  """The adapted and the base resnet_tiny, their initial variables, and the adapted
  model's variables with every B drawn at random (as after training)."""
  adapted = models.build_model(_model_config(), 10)
  base = models.build_model(_model_config(rank=0), 10)
  initial = state_lib.init_variables(adapted, SHAPE, seed=0)
  rng = np.random.default_rng(1)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, x: (
          rng.normal(0, 0.05, x.shape).astype(x.dtype) if path_str(p).endswith('/lora_b') else x
      ),
      initial,
  )
  return adapted, base, initial, trained


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(2).integers(0, 256, (4,) + SHAPE, dtype=np.uint8)


def _logits(model, variables, images):
  return np.asarray(jax.jit(model.apply)(variables, images))


def _numpy_merged(params):
  """Each adapted kernel as W + (alpha / r) * A @ B by an explicit sum over r, float64."""

  def walk(tree):
    if 'lora_a' not in tree:
      return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}
    a, b = np.asarray(tree['lora_a'], np.float64), np.asarray(tree['lora_b'], np.float64)
    delta = sum(a[..., r, None] * b[r] for r in range(a.shape[-1]))  # (..., in, out)
    kernel = np.asarray(tree['kernel'], np.float64) + ALPHA / RANK * delta
    rest = {k: v for k, v in tree.items() if k not in ('lora_a', 'lora_b')}
    return {**rest, 'kernel': kernel.astype(np.float32)}

  return walk(params)


def test_the_initial_adapted_model_is_the_base_model(models_and_variables, images):
  adapted, base, initial, _ = models_and_variables
  plain = state_lib.init_variables(base, SHAPE, seed=0)
  # The factors draw from their own stream: the base weights of a seed do not move.
  without = restore.merged(adapted, initial)[1]
  for x, y in zip(jax.tree.leaves(without), jax.tree.leaves(plain), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  np.testing.assert_array_equal(_logits(adapted, initial, images), _logits(base, plain, images))
  # B starts at zero, A does not (peft's kaiming-uniform: |A| <= 1/sqrt(fan_in)).
  conv = initial['params']['backbone']['conv1_conv']
  assert conv['lora_a'].shape == (7, 7, 3, RANK) and conv['lora_b'].shape == (RANK, 16)
  assert not conv['lora_b'].any() and conv['lora_a'].std() > 0
  assert np.abs(conv['lora_a']).max() <= 1 / np.sqrt(7 * 7 * 3)


def test_adapted_logits_equal_numpy_merged_kernels_and_the_merge(models_and_variables, images):
  adapted, base, _, trained = models_and_variables
  got = _logits(adapted, trained, images)
  explicit = {**trained, 'params': _numpy_merged(trained['params'])}
  np.testing.assert_allclose(got, _logits(base, explicit, images), rtol=1e-5, atol=1e-5)
  plain_model, merged = restore.merged(adapted, trained)
  assert plain_model.lora is None and plain_model == base
  np.testing.assert_allclose(_logits(plain_model, merged, images), got, rtol=1e-5, atol=1e-5)
  # One layer's merged kernel against the explicit formula.
  np.testing.assert_allclose(
      merged['params']['backbone']['conv2_block1_2_conv']['kernel'],
      explicit['params']['backbone']['conv2_block1_2_conv']['kernel'],
      rtol=1e-6,
      atol=1e-6,
  )
  assert np.abs(got - _logits(base, trained | {'params': merged['params']}, images)).max() < 1e-5


def _backbone_kernels(model):
  params = models.abstract_variables(model, SHAPE)['params']
  return {
      layer.name: params['backbone'][layer.name]['kernel'].shape
      for layer in model.backbone.layers
      if layer.kind in CONV_KINDS and layer.groups == 1
  }


def test_summary_counts_the_factors_and_the_head():
  cfg = helpers.tiny_config(config_lib.phase(freeze='none'))
  cfg.model.lora.rank = RANK
  cfg.model.num_classes = 10
  table, _ = summary.summarize_config(cfg)
  base = models.build_model(_model_config(rank=0), 10)
  # r * (in * kh * kw + out) per adapted layer, from the base model's own kernel shapes.
  expected = sum(
      RANK * (int(np.prod(shape[:-1])) + shape[-1]) for shape in _backbone_kernels(base).values()
  )
  head = models.abstract_variables(base, SHAPE)['params']['head']
  expected += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(head))
  assert table.trainable == expected
  # Every Conv2D of resnet_tiny has one (its Dense layers are the head's).
  adapted = models.abstract_variables(models.build_model(_model_config(), 10), SHAPE)['params']
  assert {n for n, p in adapted['backbone'].items() if 'lora_a' in p} == set(
      _backbone_kernels(base)
  )
  assert len(_backbone_kernels(base)) == 17


def _trained(model, spec):
  params = models.abstract_variables(model, SHAPE)['params']
  labels = freeze.freeze_labels(params, spec, model.backbone.layers, model.layer_stages())
  return {
      path_str(p)
      for p, label in jax.tree_util.tree_flatten_with_path(labels)[0]
      if label == freeze.TRAINABLE
  }


def test_freeze_specs_with_adapters(models_and_variables):
  adapted, base = models_and_variables[:2]
  head = {p for p in _trained(adapted, 'backbone')}
  assert head and all(p.startswith('head/') for p in head)
  factors = {p for p in _trained(adapted, 'none') - head}
  assert factors and all(p.rsplit('/', 1)[1] in ('lora_a', 'lora_b') for p in factors)
  assert _trained(adapted, 'lora+head') == factors | head
  norm = _trained(adapted, 'lora+norm') - factors
  assert norm and all(p.endswith(('_bn/scale', '_bn/bias')) for p in norm)
  # A layer slice freezes the adapters of its layers, and every base weight.
  conv5 = _trained(adapted, 'stages[:-1]') - head
  assert conv5 and {p.split('/')[1][:6] for p in conv5} == {'conv5_'} and conv5 <= factors
  # BatchNorm stays in inference mode: its scale does not train.
  labels = freeze.freeze_labels(
      models.abstract_variables(adapted, SHAPE)['params'], 'none', adapted.backbone.layers
  )
  assert not freeze.bn_train_layers(labels, {'backbone': adapted.backbone.layers})
  with pytest.raises(freeze.FreezeSpecError, match="'lora' trains LoRA adapters, but"):
    _trained(base, 'lora+head')


def test_the_target_regex_picks_the_layers():
  only = models.build_model(_model_config(target='conv5_block1_[12]_conv'), 10)
  params = models.abstract_variables(only, SHAPE)['params']['backbone']
  assert sorted(name for name, p in params.items() if 'lora_a' in p) == [
      'conv5_block1_1_conv',
      'conv5_block1_2_conv',
  ]
  none = models.build_model(_model_config(target='^head/'), 10)
  with pytest.raises(ConfigError, match=r"config.model.lora.target='\^head/' matches no kernel"):
    models.abstract_variables(none, SHAPE)


def test_weights_load_the_base_and_keep_the_factors(models_and_variables):
  adapted, base, initial, trained = models_and_variables
  other = state_lib.init_variables(base, SHAPE, seed=7)  # a plain run's variables
  loaded, report = weights.load_variables(other, adapted, trained, 'plain run')
  assert report.loaded and not report.initialised
  assert jax.tree.structure(loaded) == jax.tree.structure(trained)
  for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]:
    path = path_str(p)
    source = trained if path.endswith(('/lora_a', '/lora_b')) else other
    node = source
    for key in path.split('/'):
      node = node[key]
    assert np.asarray(x).tobytes() == np.asarray(node).tobytes(), path


def _lora_run_config():
  cfg = helpers.tiny_config(
      config_lib.phase(name='lora', learning_rate=1e-2, epochs=2),
      batch_size=16,
      max_examples=40,
  )
  cfg.model.lora.rank = RANK
  cfg.model.lora.alpha = ALPHA
  cfg.report.tensorboard = False
  cfg.data.test_split = None
  return cfg


def _state(workdir):
  step = checkpoints.complete_steps(RunDir(workdir).latest)[-1]
  return weights.read_variable_tree(RunDir(workdir).latest / str(step) / 'state')


@pytest.mark.slow
def test_a_lora_run_trains_only_factors_and_head_resumes_bitwise_and_merges(tmp_path, monkeypatch):
  devices = jax.devices()[:2]
  whole = train.train_and_evaluate(_lora_run_config(), tmp_path / 'whole', devices=devices)

  original = checkpoints.Checkpoints.save

  class Stop(Exception):
    pass

  def save(self, state, meta):
    original(self, state, meta)
    if meta['phase_epochs_done'] == 1:
      self.wait()
      raise Stop

  with monkeypatch.context() as patch:
    patch.setattr(checkpoints.Checkpoints, 'save', save)
    with pytest.raises(Stop):
      train.train_and_evaluate(_lora_run_config(), tmp_path / 'cut', devices=devices)
  resumed = train.train_and_evaluate(_lora_run_config(), tmp_path / 'cut', devices=devices)
  assert resumed == whole
  a, b = _state(tmp_path / 'whole'), _state(tmp_path / 'cut')
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

  # The base weights and BatchNorm statistics are the initial ones to the bit.
  model = models.build_model(_lora_run_config().model, 10)
  side = restore.read_dataset_info(tmp_path / 'whole').image_shape
  initial = state_lib.init_variables(model, side, 0)
  changed = set()
  for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path({k: a[k] for k in ('params', 'batch_stats')})[0],
      jax.tree.leaves(initial),
      strict=True,
  ):
    if np.asarray(x).tobytes() != np.asarray(y).tobytes():
      changed.add(path_str(p))
  assert changed and all(
      p.startswith('params/head/') or p.endswith(('/lora_a', '/lora_b')) for p in changed
  )
  assert any(p.endswith('/lora_b') for p in changed)

  # load_run merges: the plain model's logits are the adapted model's.
  run = restore.load_run(tmp_path / 'whole', 'latest')
  assert run.model.lora is None and not any(
      'lora' in path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.variables)[0]
  )
  unmerged = {'params': a['params'], 'batch_stats': a['batch_stats']}
  batch = np.random.default_rng(3).integers(0, 256, (4,) + tuple(side), dtype=np.uint8)
  np.testing.assert_allclose(
      _logits(run.model, run.variables, batch),
      _logits(model, unmerged, batch),
      rtol=1e-5,
      atol=1e-5,
  )
  # config.init_from of the run starts from those merged weights too.
  best = restore.load_run(tmp_path / 'whole')
  started = restore.init_from_variables(restore.init_from_folder(tmp_path / 'whole'))
  jax.tree.map(np.testing.assert_array_equal, started, best.variables)


def test_benchmark_cost_counts_lora_and_norm_trainables_and_adam_state():
  """scripts/benchmark.py's modes lora and norm, built as its --cost compiles them: the
  trainable count and Adam's state (two float32 values a trainable parameter, and its
  step count)."""
  benchmark = scripts_loader.load('benchmark')
  base = models.build_model(_model_config(rank=0), 10)
  params = models.abstract_variables(base, SHAPE)['params']
  head = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params['head']))
  rank = 3
  factors = sum(rank * (int(np.prod(s[:-1])) + s[-1]) for s in _backbone_kernels(base).values())
  bn = sum(
      int(np.prod(p.shape))
      for layer in base.backbone.layers
      if layer.kind == 'BatchNormalization'
      for p in jax.tree.leaves(params['backbone'][layer.name])
  )
  for mode, expected in (('lora', factors + head), ('norm', bn + head)):
    built = benchmark.build_step(
        'resnet_tiny', mode, 8, 16, 'float32', devices=jax.devices()[:1], lora_rank=rank
    )
    assert built.trainable_params == expected, mode
    assert 8 * expected <= built.opt_state_bytes <= 8 * expected + 64, mode
