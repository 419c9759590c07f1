"""Optimizers: schedules, Keras parity, decoupled weight decay, clipping, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fineflax import config as config_lib
from fineflax.errors import ConfigError
from fineflax.train import optimizers, update_rules

pytestmark = pytest.mark.slow  # compares with Keras' optimizers


def _params(seed: int = 0) -> dict:
  """A small tree with the path shapes of a model: a conv, a BN layer and a head."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      'backbone': {
          'conv1_conv': {'kernel': normal(3, 3, 2, 4)},
          'conv2_conv': {'kernel': normal(3, 3, 4, 4), 'bias': normal(4)},
          'conv2_bn': {'scale': normal(4), 'bias': normal(4)},
      },
      'head': {'dense': {'kernel': normal(4, 3), 'bias': normal(3)}},
  }


BATCHNORM_LAYERS = frozenset({'backbone/conv2_bn'})
FROZEN_SPEC = 'regex:^backbone/conv1_conv/'


def _grads_like(tree, seed: int, scale: float = 1.0):
  """Gradients of magnitude in [0.5, 1.5] x scale with random signs, MaskedNodes kept.

  Bounded away from 0 so that the epsilons of Adam weigh at most ~1e-7 / 0.5 of an update.
  """
  rng = np.random.default_rng(seed)

  def one(x):
    size = rng.uniform(0.5, 1.5, x.shape) * rng.choice([-1.0, 1.0], x.shape)
    return jnp.asarray(size * scale, x.dtype)

  return jax.tree.map(one, tree)


def _partitioned(phase, params, steps_per_epoch: int = 10):
  """The phase's optimizer with FROZEN_SPEC's labels, a jitted step on full trees."""
  groups = optimizers.param_groups(params, FROZEN_SPEC, [])
  opt = optimizers.build_optimizer(phase, steps_per_epoch, groups, BATCHNORM_LAYERS)

  @jax.jit
  def step(params, opt_state, grads):
    view = opt.trainable(params)
    updates, opt_state = opt.tx.update(opt.trainable(grads), opt_state, view)
    return opt.merge(optax.apply_updates(view, updates), params), opt_state

  return step, opt.init(params)


def _scalar_rates(phase, steps_per_epoch: int, batches: int) -> list[float]:
  """The rates plain SGD actually applies: minus the update of a unit gradient, per batch."""
  tx = optimizers.build_optimizer(phase, steps_per_epoch).tx
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rates = []
  for _ in range(batches):
    updates, state = update({'w': jnp.ones(())}, state, params)
    rates.append(-float(updates['w']))
  return rates


# --- schedules ---------------------------------------------------------------------------

_COS = lambda fraction: 0.05 * (1 + math.cos(math.pi * fraction))

# 4 epochs of 10 updates at lr 0.1: (phase keys, {update: expected rate}).
SCHEDULE_CASES = {
    'constant': ({}, {0: 0.1, 17: 0.1, 39: 0.1}),
    'cosine': ({'schedule': 'cosine'}, {0: 0.1, 10: _COS(0.25), 20: 0.05, 30: _COS(0.75), 40: 0.0}),
    'warmup_cosine': (
        {'schedule': 'warmup_cosine', 'warmup_epochs': 1.0},
        {0: 0.0, 5: 0.05, 10: 0.1, 25: 0.05, 40: 0.0},
    ),
    'step': (
        {'schedule': 'step', 'decay_epochs': (1, 3)},
        {0: 0.1, 9: 0.1, 10: 0.01, 29: 0.01, 30: 0.001, 39: 0.001},
    ),
}


@pytest.mark.parametrize('name', sorted(SCHEDULE_CASES))
def test_schedule_values_and_the_rates_sgd_applies(name):
  keys, expected = SCHEDULE_CASES[name]
  phase = config_lib.phase(optimizer='sgd', learning_rate=0.1, epochs=4, **keys)
  opt = optimizers.build_optimizer(phase, steps_per_epoch=10)
  for update, rate in expected.items():
    assert opt.learning_rate(update) == pytest.approx(rate, rel=1e-6, abs=1e-9), update
  applied = _scalar_rates(phase, 10, 40)
  # atol: float32 cosines near the end, jitted or not, differ by a few ulps of 0.1.
  np.testing.assert_allclose(
      applied, [opt.learning_rate(i) for i in range(40)], rtol=1e-6, atol=3e-8
  )


def test_learning_rate_counts_updates_under_accumulation():
  # 10 batches per epoch, 3 per update; the remainder carries into the next epoch: 6
  # updates in 2 epochs, the second epoch starts in update 3 (batches 9-11).
  step = config_lib.phase(
      optimizer='sgd', learning_rate=0.1, epochs=2, accumulate=3, schedule='step', decay_epochs=(1,)
  )
  rate = optimizers.build_optimizer(step, steps_per_epoch=10).learning_rate
  assert [rate(b) for b in (0, 2, 3, 8)] == pytest.approx([0.1] * 4)
  assert [rate(b) for b in (9, 11, 19)] == pytest.approx([0.01] * 3)

  cosine = config_lib.phase(
      optimizer='sgd', learning_rate=0.1, epochs=2, accumulate=3, schedule='cosine'
  )
  rate = optimizers.build_optimizer(cosine, steps_per_epoch=10).learning_rate
  assert rate(5) == pytest.approx(_COS(1 / 6))  # batch 5 feeds update 1 of 6
  assert rate(9) == pytest.approx(0.05)
  assert rate(18) == pytest.approx(0.0, abs=1e-9)

  warmup = config_lib.phase(
      optimizer='sgd',
      learning_rate=0.1,
      epochs=2,
      accumulate=2,
      schedule='warmup_cosine',
      warmup_epochs=0.5,
  )
  rate = optimizers.build_optimizer(warmup, steps_per_epoch=8).learning_rate
  # 4 updates per epoch, so 2 updates of warmup: 0, 0.05, then the peak.
  assert [rate(b) for b in (0, 1, 2, 4)] == pytest.approx([0.0, 0.0, 0.05, 0.1])


def test_fewer_batches_than_accumulate_still_make_one_update_per_epoch():
  phase = config_lib.phase(
      optimizer='sgd', learning_rate=0.1, epochs=2, accumulate=4, schedule='step', decay_epochs=(1,)
  )
  rate = optimizers.build_optimizer(phase, steps_per_epoch=2).learning_rate
  assert rate(3) == pytest.approx(0.1)
  assert rate(4) == pytest.approx(0.01)


# --- update rules ------------------------------------------------------------------------


def test_nesterov_sgd_follows_the_formula_over_three_steps():
  """Nesterov momentum as Keras' SGD writes it, v <- m v - lr g; p <- p + m v - lr g,
  unrolled by hand over 3 steps (float64) on every leaf of a model-shaped tree."""
  lr, m = 0.05, 0.9
  phase = config_lib.phase(optimizer='sgd', learning_rate=lr, momentum=m, nesterov=True)
  tx = optimizers.build_optimizer(phase, 10).tx
  start = _params()
  grads = [_grads_like(start, seed=i) for i in range(3)]
  params, state = start, tx.init(start)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)

  def by_hand(p0, g1, g2, g3):
    p0, g1, g2, g3 = (np.asarray(x, np.float64) for x in (p0, g1, g2, g3))
    p1 = p0 - lr * (1 + m) * g1  # v1 = -lr g1
    p2 = p1 - lr * (m * m * g1 + m * g2 + g2)  # v2 = -lr (m g1 + g2)
    return p2 - lr * (m**3 * g1 + m * m * g2 + m * g3 + g3)  # v3 = -lr (m^2 g1 + m g2 + g3)

  expected = jax.tree.map(by_hand, start, *grads)
  # float32 steps on values ~1: a few ulps (1e-7); plain momentum (p1 = p0 - lr g1) or a
  # wrong momentum is off by >= lr * m * 0.5 ~ 2e-2 somewhere.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params, expected)


# (Keras optimizer, its arguments, our phase keys, gradient scale). RMSprop runs on
# gradients of ~1e-3, where v ~ 1e-7 ~ epsilon: only epsilon inside the square root
# (Keras 3's placement) matches there.
KERAS_CASES = {
    'adam': ('Adam', {}, {'optimizer': 'adam'}, 1.0),
    'adamw': ('AdamW', {'weight_decay': 0.5}, {'optimizer': 'adamw', 'weight_decay': 0.5}, 1.0),
    'rmsprop': ('RMSprop', {}, {'optimizer': 'rmsprop'}, 1e-3),
    'rmsprop_momentum': (
        'RMSprop',
        {'momentum': 0.5},
        {'optimizer': 'rmsprop', 'momentum': 0.5},
        1e-3,
    ),
    'sgd_momentum_decay': (
        'SGD',
        {'momentum': 0.9, 'weight_decay': 0.5},
        {'optimizer': 'sgd', 'momentum': 0.9, 'weight_decay': 0.5},
        1.0,
    ),
    'sgd_nesterov': (
        'SGD',
        {'momentum': 0.9, 'nesterov': True},
        {'optimizer': 'sgd', 'momentum': 0.9, 'nesterov': True},
        1.0,
    ),
}


@pytest.mark.parametrize('name', sorted(KERAS_CASES))
def test_matches_keras_optimizers(keras, name):
  keras_name, keras_args, keys, scale = KERAS_CASES[name]
  lr, steps = 0.01, 5
  start = dict(_params()['head']['dense'])  # kernel (4, 3) and bias (3,)
  grads = [_grads_like(start, seed=10 + i, scale=scale) for i in range(steps)]

  variables = [keras.Variable(np.asarray(start[name])) for name in ('kernel', 'bias')]
  keras_opt = getattr(keras.optimizers, keras_name)(learning_rate=lr, **keras_args)
  for g in grads:
    keras_opt.apply([g['kernel'], g['bias']], variables)

  tx = optimizers.build_optimizer(config_lib.phase(learning_rate=lr, **keys), 10).tx
  params, state = start, tx.init(start)
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)

  # Tolerance: 5 float32 steps with differently ordered arithmetic, a few ulps (1.2e-7)
  # each on parameters ~1 (seen: up to 4.8e-7). A wrong momentum or decay rule is off by
  # >= 1e-4 here; Adam's epsilon placement shows at small gradients (test_keras_fit.py).
  for ours, theirs in ((params['kernel'], variables[0]), (params['bias'], variables[1])):
    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=0, atol=2e-6)
  assert float(jnp.max(jnp.abs(params['kernel'] - start['kernel']))) > 5e-3


# --- weight decay ------------------------------------------------------------------------


def _zero_grad_steps(phase, steps: int = 3):
  params = _params()
  step, state = _partitioned(phase, params)
  current = params
  for _ in range(steps):
    current, state = step(current, state, jax.tree.map(jnp.zeros_like, params))
  return params, current


@pytest.mark.parametrize('decay_batchnorm', [False, True])
def test_weight_decay_spares_batchnorm_and_frozen_leaves(decay_batchnorm):
  # Zero gradients: plain SGD moves nothing, so every change is the decay, p *= 1 - lr * wd.
  phase = config_lib.phase(
      optimizer='sgd', learning_rate=0.1, weight_decay=0.2, decay_batchnorm=decay_batchnorm
  )
  before, after = _zero_grad_steps(phase, steps=3)
  shrink = (1 - 0.1 * 0.2) ** 3
  for layer, name in (('conv2_conv', 'kernel'), ('conv2_conv', 'bias')):
    np.testing.assert_allclose(
        after['backbone'][layer][name], before['backbone'][layer][name] * shrink, rtol=1e-6
    )
  for layer, name in (('dense', 'kernel'), ('dense', 'bias')):
    np.testing.assert_allclose(
        after['head'][layer][name], before['head'][layer][name] * shrink, rtol=1e-6
    )
  for name in ('scale', 'bias'):
    bn_before, bn_after = before['backbone']['conv2_bn'][name], after['backbone']['conv2_bn'][name]
    if decay_batchnorm:
      np.testing.assert_allclose(bn_after, bn_before * shrink, rtol=1e-6)
    else:
      np.testing.assert_array_equal(bn_after, bn_before)
  frozen_before = np.asarray(before['backbone']['conv1_conv']['kernel'])
  frozen_after = np.asarray(after['backbone']['conv1_conv']['kernel'])
  assert frozen_before.tobytes() == frozen_after.tobytes()


def test_adamw_decays_by_default_and_adam_does_not():
  adamw, adam = (config_lib.phase(optimizer=o, learning_rate=0.5) for o in ('adamw', 'adam'))
  assert update_rules.weight_decay(adamw) == 1e-4 and update_rules.weight_decay(adam) == 0.0
  before, after = _zero_grad_steps(adamw, steps=1)
  kernel = before['head']['dense']['kernel']
  # The change is ~5e-5 of the kernel; compare it (not the kernel) to see the decay rule.
  np.testing.assert_allclose(
      after['head']['dense']['kernel'] - kernel, -0.5 * 1e-4 * kernel, rtol=1e-2, atol=2e-7
  )
  np.testing.assert_array_equal(
      after['backbone']['conv2_bn']['scale'], before['backbone']['conv2_bn']['scale']
  )
  before, after = _zero_grad_steps(adam, steps=1)
  np.testing.assert_array_equal(after['head']['dense']['kernel'], kernel)


def test_decays_path_rule():
  bn = frozenset({'backbone/conv1_bn', 'head/batch_normalization'})
  assert update_rules.decays('backbone/conv1_conv/kernel', bn, False)
  assert update_rules.decays('backbone/conv1_conv/bias', bn, False)
  assert not update_rules.decays('backbone/conv1_bn/scale', bn, False)
  assert not update_rules.decays('head/batch_normalization/bias', bn, False)
  assert update_rules.decays('head/batch_normalization/bias', bn, True)


# --- clipping ----------------------------------------------------------------------------


def test_clipping_bounds_the_update_by_the_global_norm():
  phase = config_lib.phase(optimizer='sgd', learning_rate=0.5, clip_norm=2.0)
  tx = optimizers.build_optimizer(phase, 10).tx
  params = _params()
  norm = lambda tree: float(optax.tree.norm(tree))

  huge = _grads_like(params, seed=3, scale=1e6)
  updates, _ = tx.update(huge, tx.init(params), params)
  assert norm(updates) == pytest.approx(0.5 * 2.0, rel=1e-5)
  # Clipping rescales, it does not turn: the update is still along the gradient.
  direction = jax.tree.map(lambda u, g: u / g, updates, huge)
  assert np.ptp(np.concatenate([np.ravel(x) for x in jax.tree.leaves(direction)])) < 1e-9

  small = jax.tree.map(lambda g: g * (0.5 / norm(huge)), huge)  # global norm 0.5 < 2
  updates, _ = tx.update(small, tx.init(params), params)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.5 * g, rtol=1e-6), updates, small)


# --- accumulation ------------------------------------------------------------------------


def test_accumulation_equals_one_update_with_the_mean_gradient():
  # AdamW (decay needs the parameters through MultiSteps), clipping (of the mean) and a
  # cosine schedule (counting updates, not batches), inside partition_optimizer.
  keys = dict(
      optimizer='adamw',
      learning_rate=0.05,
      weight_decay=0.3,
      clip_norm=1.0,
      schedule='cosine',
      epochs=1,
  )
  params = _params()
  accumulated, acc_state = _partitioned(
      config_lib.phase(accumulate=3, **keys), params, steps_per_epoch=6
  )
  single, single_state = _partitioned(config_lib.phase(**keys), params, steps_per_epoch=2)
  ours = reference = params
  for update in range(2):
    micro = [_grads_like(params, seed=100 + 3 * update + i) for i in range(3)]
    for i, grads in enumerate(micro):
      previous = ours
      ours, acc_state = accumulated(ours, acc_state, grads)
      if i < 2:
        jax.tree.map(np.testing.assert_array_equal, ours, previous)
    mean = jax.tree.map(lambda *g: sum(g) / 3, *micro)
    reference, single_state = single(reference, single_state, mean)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, reference
    )
  assert not np.allclose(ours['head']['dense']['kernel'], params['head']['dense']['kernel'])
  frozen = (params['backbone']['conv1_conv']['kernel'], ours['backbone']['conv1_conv']['kernel'])
  assert np.asarray(frozen[0]).tobytes() == np.asarray(frozen[1]).tobytes()


# --- check_phase -------------------------------------------------------------------------

BAD_PHASES = [
    ({'optimizer': 'adam', 'nesterov': True}, "nesterov=True needs optimizer 'sgd'"),
    ({'optimizer': 'sgd', 'nesterov': True}, 'with momentum > 0'),
    ({'optimizer': 'adamw', 'momentum': 0.9}, "momentum=0.9 has no effect with optimizer 'adamw'"),
    (
        {'schedule': 'warmup_cosine', 'warmup_epochs': 3.0, 'epochs': 3},
        "schedule 'warmup_cosine' needs warmup_epochs < epochs",
    ),
    (
        {'schedule': 'cosine', 'warmup_epochs': 1.0, 'epochs': 3},
        "warmup_epochs=1.0 needs schedule 'warmup_cosine'",
    ),
    ({'schedule': 'step', 'epochs': 5}, "schedule 'step' needs decay_epochs"),
    ({'schedule': 'step', 'decay_epochs': (0, 2), 'epochs': 5}, 'in [1, 4]'),
    ({'schedule': 'step', 'decay_epochs': (5,), 'epochs': 5}, 'decay_epochs=(5,)'),
    ({'schedule': 'step', 'decay_epochs': (2.5,), 'epochs': 5}, 'each must be an int'),
    ({'schedule': 'step', 'decay_epochs': (2, 2), 'epochs': 5}, 'appears twice'),
    ({'schedule': 'constant', 'decay_epochs': (2,), 'epochs': 5}, "needs schedule 'step'"),
    ({'optimizer': 'adam', 'decay_batchnorm': True}, 'decay_batchnorm=True needs weight_decay'),
]


@pytest.mark.parametrize('keys,message', BAD_PHASES)
def test_check_phase_rejects(keys, message):
  phase = config_lib.phase(**keys)
  with pytest.raises(ConfigError, match='^config.phases\\[2\\]\\.') as error:
    optimizers.check_phase(phase, prefix='config.phases[2].')
  assert message in str(error.value)
  with pytest.raises(ConfigError):
    optimizers.build_optimizer(phase, 10)


@pytest.mark.parametrize(
    'keys',
    [
        {'optimizer': 'sgd', 'momentum': 0.9, 'nesterov': True},
        {'optimizer': 'rmsprop', 'momentum': 0.9},
        {'optimizer': 'adamw', 'decay_batchnorm': True},
        {'schedule': 'warmup_cosine', 'warmup_epochs': 0.5, 'epochs': 1},
        {'schedule': 'step', 'decay_epochs': (3, 1), 'epochs': 5},
    ],
)
def test_check_phase_accepts(keys):
  phase = config_lib.phase(**keys)
  optimizers.check_phase(phase)
  assert isinstance(optimizers.build_optimizer(phase, 10).tx, optax.GradientTransformation)
