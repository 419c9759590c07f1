"""Discriminative fine-tuning: `phases[i].lr_groups` and `phases[i].layer_decay`.

Every expectation is computed here, independently of the code under test: each leaf's
multiplier from its path (the ResNet stage in its layer name), the gradient by `jax.grad`
of the loss written out here, Adam by one plain `optax.adam` per group.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fineflax import config as config_lib, models, train
from fineflax.data import augment as augmentation
from fineflax.data.augment import Augment
from fineflax.distributed import parallel, preemption
from fineflax.errors import ConfigError
from fineflax.pytree import path_str
from fineflax.train import freeze, optimizers, state as state_lib, step as step_lib, update_rules
from fineflax.train.summary import format_summary, summarize_config
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs

IMAGE = (16, 16, 3)
BATCH = 16
# Powers of two: lr x multiplier is then exact in float32, whatever the order of products.
LR_GROUPS = (('head', 2.0), ('regex:_bn/', 0.0))
DECAY = 0.5


def _expected_multiplier(path: str) -> float:
  """LR_GROUPS x DECAY**k for resnet_tiny, k = 6 - n for a layer of stage convN (conv1:
  the stem, 5 stages below the head)."""
  if re.search('_bn/', path):
    return 0.0
  if path.startswith('head/'):
    return 2.0
  n = int(re.match(r'backbone/conv(\d)_', path).group(1))
  return DECAY ** (6 - n)


def _model():
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  model = models.build_model(cfg.model, 4, bn_axis_name=parallel.AXIS)
  return model, state_lib.init_variables(model, IMAGE, seed=0)


def _groups(model, params, lr_groups=LR_GROUPS, layer_decay=DECAY, spec='none'):
  return optimizers.param_groups(
      params, spec, model.backbone.layers, lr_groups, layer_decay, model.layer_stages()
  )


def _flat(tree, arrays=True):
  return {
      path_str(p): np.asarray(x) if arrays else x
      for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.integers(0, 256, (BATCH,) + IMAGE, dtype=np.uint8),
      'label': rng.integers(0, 4, BATCH).astype(np.int32),
      'weight': np.ones(BATCH, np.float32),
  }


def test_groups_follow_stages_first_match_and_freeze():
  model, variables = _model()
  groups = _groups(model, variables['params'])
  mults = {**groups.multipliers, freeze.FROZEN: 0.0}
  got = {p: mults[g] for p, g in _flat(groups.groups, False).items()}
  assert got == {p: _expected_multiplier(p) for p in got}
  assert sorted(groups.multipliers.values(), reverse=True) == [2.0] + [
      DECAY**k for k in range(1, 6)
  ]
  # The freeze spec wins: conv5 frozen whatever its multiplier.
  frozen = _groups(model, variables['params'], spec='regex:^backbone/conv5_')
  assert all(g == freeze.FROZEN for p, g in _flat(frozen.groups, False).items() if '/conv5_' in p)
  assert DECAY not in frozen.multipliers.values()
  # The first matching pair wins; unmatched leaves (the head) train at 1.
  first = _groups(
      model,
      variables['params'],
      layer_decay=None,
      lr_groups=(('regex:^backbone/conv5_block1_1_', 4.0), ('backbone', 0.25)),
  )
  want = lambda p: 4.0 if '/conv5_block1_1_' in p else 0.25 if p.startswith('backbone/') else 1
  mults = first.multipliers
  assert {p: mults[g] for p, g in _flat(first.groups, False).items()} == {
      p: want(p) for p in _flat(first.groups, False)
  }


def test_sgd_step_moves_each_group_by_lr_times_multiplier_times_gradient():
  model, variables = _model()
  groups = _groups(model, variables['params'])
  lr = 0.1
  phase = config_lib.phase(optimizer='sgd', learning_rate=lr)
  opt = optimizers.build_optimizer(phase, 1, groups)
  tx = opt.tx
  batch = _batch()

  def loss(params):
    images = augmentation.prepare(
        jnp.asarray(batch['image']), None, Augment(), model.image_size, train=True
    )
    logits = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        images,
        train=True,
        example_keys=jax.random.split(jax.random.key(0), BATCH),
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

  gradient = jax.grad(loss)(variables['params'])
  grads = _flat(gradient)
  # The optimizer alone: the update is -(lr x m) x g, to the bit.
  view = opt.trainable(variables['params'])
  grad_view = opt.trainable(gradient)
  updates, _ = tx.update(grad_view, tx.init(view), view)
  for path, u in _flat(updates).items():
    expected = np.float32(-lr * _expected_multiplier(path)) * grads[path]
    assert u.tobytes() == expected.tobytes(), path

  # The train step: p - lr x m x g, the gradient its own (another program: float rounding).
  mesh = parallel.make_mesh(jax.devices()[:1])
  step = step_lib.make_train_step(model, opt, mesh, seed=0)
  state = parallel.replicate(state_lib.create_train_state(variables, opt), mesh)
  state, _ = step(state, parallel.shard_batch(batch, mesh), {})
  before, after = _flat(variables['params']), _flat(jax.device_get(state.params))
  for path, p in before.items():
    m = _expected_multiplier(path)
    if m == 0:
      assert after[path].tobytes() == p.tobytes(), path
    else:
      np.testing.assert_allclose(
          after[path], p - np.float32(lr * m) * grads[path], rtol=1e-5, atol=1e-7, err_msg=path
      )
      assert not np.array_equal(after[path], p) or not grads[path].any(), path


def test_weight_decay_scales_with_the_multiplier_as_timm():
  """Decoupled decay p -= m x lr x wd x p (timm: a group's lr_scale scales its decay)."""
  model, variables = _model()
  groups = _groups(model, variables['params'])
  lr, wd = 0.1, 0.5
  phase = config_lib.phase(optimizer='sgd', learning_rate=lr, weight_decay=wd)
  opt = optimizers.build_optimizer(phase, 1, groups)
  tx = opt.tx
  view = opt.trainable(variables['params'])
  zeros = jax.tree.map(jnp.zeros_like, view)
  updates, _ = tx.update(zeros, tx.init(view), view)
  params = _flat(variables['params'])
  for path, u in _flat(updates).items():
    expected = np.float32(-lr * _expected_multiplier(path) * wd) * params[path]
    assert u.tobytes() == expected.tobytes(), path


def test_adam_groups_match_independent_adams_and_state_covers_nonzero_groups():
  model, variables = _model()
  params = variables['params']
  groups = _groups(model, params)
  lr = 1e-2
  phase = config_lib.phase(optimizer='adam', learning_rate=lr)
  opt = optimizers.build_optimizer(phase, 1, groups)
  tx = opt.tx
  view = opt.trainable(params)
  state = tx.init(view)
  # One entry per non-zero group (and FROZEN's, which holds no array).
  inner = state.inner_states[freeze.TRAINABLE].inner_state.inner_states
  assert set(inner) == set(groups.multipliers) | {freeze.FROZEN}
  assert jax.tree.leaves(inner[freeze.FROZEN]) == []
  by_path = {p: _expected_multiplier(p) for p in _flat(params)}
  for label, m in groups.multipliers.items():
    mu = _flat(inner[label].inner_state[0].mu)
    assert set(mu) == {p for p, e in by_path.items() if e == m}, label
  # Adam's moments (beside scalar step counts) cover exactly the trainable leaves.
  assert sum(x.size for x in jax.tree.leaves(inner) if x.ndim) == 2 * sum(
      p.size for path, p in _flat(params).items() if by_path[path] != 0
  )

  references = {
      m: update_rules.keras_adam(lr * m, eps=update_rules.KERAS_EPSILON)
      for m in set(by_path.values())
      if m
  }
  ref_params = {m: {p: x for p, x in _flat(params).items() if by_path[p] == m} for m in references}
  ref_states = {m: references[m].init(ref_params[m]) for m in references}
  rng = np.random.default_rng(1)
  for _ in range(3):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), view)
    updates, state = tx.update(grads, state, view)
    view = optax.apply_updates(view, updates)
    flat_grads, flat_updates = _flat(grads), _flat(updates)
    for m, ref in references.items():
      ref_updates, ref_states[m] = ref.update(
          {p: flat_grads[p] for p in ref_params[m]}, ref_states[m], ref_params[m]
      )
      ref_params[m] = optax.apply_updates(ref_params[m], ref_updates)
      for p, u in ref_updates.items():
        np.testing.assert_allclose(flat_updates[p], u, rtol=1e-6, atol=1e-12, err_msg=p)
  assert not set(_flat(view)) & {p for p, m in by_path.items() if m == 0}


def _small_config():
  return helpers.tiny_config(
      config_lib.phase(name='scratch', batchnorm='train', learning_rate=3e-3, epochs=1),
      config_lib.phase(
          name='decay',
          optimizer='adamw',
          learning_rate=1e-3,
          epochs=2,
          layer_decay=0.7,
          lr_groups=(('regex:_bn/', 0), ('head', 3.0)),
      ),
      batch_size=16,
      max_examples=40,
  )  # 3 train steps an epoch


def test_resume_mid_phase_is_bitwise(tmp_path, monkeypatch, caplog):
  devices = jax.devices()[:1]
  with caplog.at_level('INFO', logger='fineflax.train'):
    whole = train.train_and_evaluate(_small_config(), tmp_path / 'whole', devices=devices)
  assert '[decay] learning-rate groups (x learning_rate 0.001): x3: ' in caplog.text
  with monkeypatch.context() as patch:  # a SIGTERM noted mid-epoch in the decay phase
    patch.setattr(preemption.StopRequest, 'at', lambda self, step: step == 4)
    with pytest.raises(preemption.Preempted, match=r"saved step 4 \(phase 'decay'"):
      train.train_and_evaluate(_small_config(), tmp_path / 'cut', devices=devices)
  resumed = train.train_and_evaluate(_small_config(), tmp_path / 'cut', devices=devices)
  assert resumed == whole
  import orbax.checkpoint as ocp

  from fineflax.run import RunDir

  a, b = (
      ocp.StandardCheckpointer().restore(RunDir(d).latest / str(whole['step']) / 'state')
      for d in (tmp_path / 'whole', tmp_path / 'cut')
  )
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.mark.parametrize(
    'lr_groups, layer_decay, message',
    [
        ((('layers[:', 0.1),), None, r"config\.phases\[1\]\.lr_groups\[0\]: spec 'layers\[:'"),
        (
            (('head', 1.0), ('backbone', -0.5)),
            None,
            r'config\.phases\[1\]\.lr_groups\[1\]: multiplier -0\.5 must be a number >= 0',
        ),
        ((('head',),), None, r'config\.phases\[1\]\.lr_groups\[0\]: expected a \(spec, multiplier'),
        ((('none', 1.0),), None, r"config\.phases\[1\]\.lr_groups\[0\]: spec 'none' matches"),
        (None, 0.0, r'config\.phases\[1\]\.layer_decay=0\.0: must be in \(0, 1\]'),
        (None, 1.5, r'config\.phases\[1\]\.layer_decay=1\.5: must be in \(0, 1\]'),
    ],
)
def test_invalid_specs_and_multipliers_are_one_line_config_errors(lr_groups, layer_decay, message):
  cfg = _small_config()
  cfg.phases = (
      cfg.phases[0],
      config_lib.phase(name='x', lr_groups=lr_groups, layer_decay=layer_decay),
  )
  with pytest.raises(ConfigError, match='^' + message) as caught:
    config_lib.validate(cfg)
  assert '\n' not in str(caught.value)


@pytest.mark.parametrize(
    'lr_groups, message',
    [
        (
            (('layers[:999]', 0.1),),
            r'config\.phases\[1\]\.lr_groups\[0\]: spec .* index 999 is ' 'beyond the backbone',
        ),
        (
            (('backbone', 0.5), ('regex:^backbone/conv5', 0.1)),
            r'config\.phases\[1\]\.lr_groups\[1\]: .* matches no parameter that an earlier '
            'pair left',
        ),
        ((('regex:.', 0),), r'config\.phases\[1\]\.lr_groups: .* nothing would train'),
    ],
)
def test_specs_that_do_not_fit_the_model_fail_before_writing(tmp_path, lr_groups, message):
  cfg = _small_config()
  cfg.phases = (cfg.phases[0], config_lib.phase(name='x', lr_groups=lr_groups))
  with pytest.raises(ConfigError, match='^' + message) as caught:
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:1])
  assert '\n' not in str(caught.value)
  assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').iterdir())


def test_summary_shows_each_layers_multiplier():
  cfg = _small_config()
  cfg.model.num_classes = 10
  table, title = summarize_config(cfg, 1)
  text = format_summary(table, title)
  rows = {r.name: r.multiplier for r in table.rows}
  assert rows['conv1_conv'] == f'{0.7 ** 5:g}' and rows['conv5_block1_1_conv'] == '0.7'
  assert rows['dense'] == '3' and rows['conv1_bn'] == '-' and rows['conv1_pad'] == '-'
  assert 'LR x' in text and 'Learning-rate groups (x learning_rate): x3: ' in text
  plain, _ = summarize_config(cfg, 0)
  assert 'LR x' not in format_summary(plain, 'x')
