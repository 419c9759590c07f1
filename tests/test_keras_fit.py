"""Keras parity of whole trajectories: fineflax's optimizers against Keras 3 and tf_keras `fit`.

A frozen Dense-relu layer feeds a trained Dense head (a miniature of fine-tuning a network
with its first layers frozen), full batches, softmax cross-entropy from logits. Keras
`fit(..., batch_size=N, shuffle=False)` makes one update an epoch and reports the loss
before it; the fineflax side runs `build_optimizer(phase, 1).tx` in a jitted loop on the
same loss from the same weights, with the frozen layer as `optax.MaskedNode()`s (the
trainable view the product's optimizer sees).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fineflax import config as config_lib
from fineflax.train import optimizers
from fineflax.train.update_rules import keras_adam, scale_by_keras_adam

pytestmark = pytest.mark.slow  # compares with Keras 3 and tf_keras (TensorFlow) training

N, D, H, C = 64, 16, 64, 10  # examples (one batch), inputs, frozen hidden units, classes
EPOCHS = 30

# Float32 rounding: the gradients come from XLA and TensorFlow kernels summing in other
# orders, and optax and Keras order the update's arithmetic differently: a few ulps (1.2e-7)
# an epoch, which do not grow over the 30 epochs (the head's problem is convex). Seen: losses
# within 2.5e-7 (relative), weights within 7.4e-7 of the head's largest displacement. Adam's
# epsilon added after the bias correction (optax.adam) is off by 4e-5 .. 6e-5 and 0.37 .. 0.46.
LOSS_RTOL = 1e-6
WEIGHT_TOL = 5e-6

# name: (phase keys, Keras optimizer, its arguments); the same names in Keras 3 and tf_keras.
CASES = {
    'sgd': ({'optimizer': 'sgd', 'learning_rate': 0.1}, 'SGD', {'learning_rate': 0.1}),
    'sgd_momentum': (
        {'optimizer': 'sgd', 'learning_rate': 0.1, 'momentum': 0.9},
        'SGD',
        {'learning_rate': 0.1, 'momentum': 0.9},
    ),
    'sgd_nesterov': (
        {'optimizer': 'sgd', 'learning_rate': 0.1, 'momentum': 0.9, 'nesterov': True},
        'SGD',
        {'learning_rate': 0.1, 'momentum': 0.9, 'nesterov': True},
    ),
    'rmsprop': (
        {'optimizer': 'rmsprop', 'learning_rate': 1e-3},
        'RMSprop',
        {'learning_rate': 1e-3},
    ),
    'rmsprop_momentum': (
        {'optimizer': 'rmsprop', 'learning_rate': 1e-3, 'momentum': 0.9},
        'RMSprop',
        {'learning_rate': 1e-3, 'momentum': 0.9},
    ),
    'adam': ({'optimizer': 'adam', 'learning_rate': 1e-2}, 'Adam', {'learning_rate': 1e-2}),
    'adam_cosine': (
        {'optimizer': 'adam', 'learning_rate': 1e-2, 'schedule': 'cosine'},
        'Adam',
        {'learning_rate': ('CosineDecay', 1e-2, EPOCHS)},
    ),
    'adamw': (
        {'optimizer': 'adamw', 'learning_rate': 1e-2, 'weight_decay': 0.05},
        'AdamW',
        {'learning_rate': 1e-2, 'weight_decay': 0.05},
    ),
}


@pytest.fixture(scope='module')
def tf_keras():
  """tf_keras (Keras 2 on TensorFlow), imported once, when a test first needs it."""
  import tf_keras as module  # pylint: disable=g-import-not-at-top

  return module


@pytest.fixture(params=['keras', 'tf_keras'])
def reference(request):
  """Keras 3 (on JAX) or tf_keras: the module whose optimizers and `fit` are compared."""
  return request.getfixturevalue(request.param)


@functools.cache
def _data() -> tuple[np.ndarray, ...]:
  """Inputs, labels and the initial weights [frozen kernel, bias, head kernel, bias].

  The frozen units' scales span 1 .. 1e-4, so the head's gradients range from ~0.1 down to
  1e-5 and below over the epochs: where Keras' epsilon (added before the bias correction)
  is a visible share of Adam's update, as in a fine-tuned head on a pretrained network.
  """
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N, D)).astype(np.float32)
  y = rng.integers(0, C, size=N).astype(np.int32)
  unit_scales = np.logspace(0, -4, H)
  kernel = (rng.normal(size=(D, H)) * np.sqrt(2 / D) * unit_scales).astype(np.float32)
  head = (rng.normal(size=(H, C)) * 0.1).astype(np.float32)
  return x, y, kernel, np.zeros(H, np.float32), head, np.zeros(C, np.float32)


def _keras_optimizer(module, case: str):
  _, name, args = CASES[case]
  args = dict(args)
  if isinstance(args['learning_rate'], tuple):
    schedule, lr, steps = args['learning_rate']
    args['learning_rate'] = getattr(module.optimizers.schedules, schedule)(lr, steps)
  return getattr(module.optimizers, name)(**args)


_KERAS_FITS = {}


def _keras_fit(module, case: str) -> tuple[np.ndarray, list[np.ndarray]]:
  """Keras' per-epoch losses and final head [kernel, bias] (each fit once per module)."""
  key = (module.__name__, case)
  if key not in _KERAS_FITS:
    x, y, *weights = _data()
    model = module.Sequential(
        [
            module.Input(shape=(D,)),
            module.layers.Dense(H, activation='relu', trainable=False),
            module.layers.Dense(C),
        ]
    )
    model.set_weights(weights)
    model.compile(
        optimizer=_keras_optimizer(module, case),
        loss=module.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=N, epochs=EPOCHS, shuffle=False, verbose=0)
    _KERAS_FITS[key] = (np.asarray(history.history['loss']), model.get_weights()[2:])
  return _KERAS_FITS[key]


def _fit(tx: optax.GradientTransformation) -> tuple[np.ndarray, list[np.ndarray]]:
  """`_keras_fit` with `tx`: the loss before each update, and the final head."""
  x, y, kernel, bias, head_kernel, head_bias = _data()
  hidden = jax.nn.relu(x @ kernel + bias)

  def loss_fn(head):
    logits = hidden @ head['kernel'] + head['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  params = {
      'frozen': {'kernel': optax.MaskedNode(), 'bias': optax.MaskedNode()},
      'head': {'kernel': jnp.asarray(head_kernel), 'bias': jnp.asarray(head_bias)},
  }

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params['head'])
    updates, state = tx.update({'frozen': params['frozen'], 'head': grads}, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = tx.init(params), []
  for _ in range(EPOCHS):
    params, state, loss = step(params, state)
    losses.append(loss)
  return np.asarray(losses), [np.asarray(params['head'][k]) for k in ('kernel', 'bias')]


def _differences(ours, theirs) -> tuple[float, float]:
  """Largest relative difference of the losses, and of the final head weights as a share
  of the head's largest displacement from its initial weights."""
  (our_losses, our_head), (losses, head) = ours, theirs
  start = _data()[4:]
  loss = float(np.max(np.abs(our_losses - losses) / np.abs(losses)))
  weights = max(
      float(np.max(np.abs(a - b)) / np.max(np.abs(b - s))) for a, b, s in zip(our_head, head, start)
  )
  return loss, weights


def _fineflax_tx(case: str) -> optax.GradientTransformation:
  phase = config_lib.phase(epochs=EPOCHS, **CASES[case][0])
  return optimizers.build_optimizer(phase, 1).tx


@pytest.mark.parametrize('case', sorted(CASES))
def test_fit_trajectory_matches_keras(reference, case):
  losses, _ = theirs = _keras_fit(reference, case)
  assert losses[-1] < losses[0] - 0.1  # it trained
  loss, weights = _differences(_fit(_fineflax_tx(case)), theirs)
  assert loss <= LOSS_RTOL, f'{case}: losses differ by {loss:.2e} (relative)'
  assert weights <= WEIGHT_TOL, f'{case}: final weights differ by {weights:.2e}'


def test_trajectory_tells_where_adam_adds_epsilon(keras):
  """The data above make the epsilon placement visible: optax.adam's is far off."""
  loss, weights = _differences(_fit(optax.adam(1e-2, eps=1e-7)), _keras_fit(keras, 'adam'))
  assert loss > 10 * LOSS_RTOL and weights > 1e3 * WEIGHT_TOL


# --- single steps --------------------------------------------------------------------------

STEPS, LR = 6, 1e-3


def _small_grads() -> list[np.ndarray]:
  """Gradients of 1e-6 .. 1e-3, random signs: the epsilon hat is up to ~all of an update."""
  rng = np.random.default_rng(1)
  return [
      (rng.normal(size=256) * 10.0 ** rng.uniform(-6, -3, 256)).astype(np.float32)
      for _ in range(STEPS)
  ]


def _keras_steps(module) -> np.ndarray:
  """Keras Adam's update at each step, read exactly off a variable reset to 0 before it."""
  grads, zeros = _small_grads(), np.zeros(256, np.float32)
  opt = module.optimizers.Adam(LR)
  if module.__name__ == 'keras':
    var = module.Variable(zeros)
    apply = lambda g: opt.apply([jnp.asarray(g)], [var])
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    var = tf.Variable(zeros)
    apply = lambda g: opt.apply_gradients([(tf.constant(g), var)])
  steps = []
  for g in grads:
    var.assign(zeros)
    apply(g)
    steps.append(np.asarray(var.numpy()))
  return np.stack(steps)


def _optax_steps(tx: optax.GradientTransformation) -> np.ndarray:
  update = jax.jit(tx.update)
  state, steps = tx.init(jnp.zeros(256)), []
  for g in _small_grads():
    u, state = update(jnp.asarray(g), state)
    steps.append(np.asarray(u))
  return np.stack(steps)


def _step_errors(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
  """Per step, the largest difference as a share of the step's largest update."""
  return np.max(np.abs(ours - theirs), axis=1) / np.max(np.abs(theirs), axis=1)


def test_keras_adam_steps_match_keras(reference):
  theirs = _keras_steps(reference)
  # optax's moments, (1 - b) g + b m, round otherwise than Keras' m + (g - m)(1 - b); where
  # m nearly cancels that is a large share of m, but a few ulps (1.2e-7) of the step's
  # largest update (seen: <= 2.5e-7). Elementwise relative errors reach 3e-5 there.
  errors = _step_errors(_optax_steps(keras_adam(optax.constant_schedule(LR))), theirs)
  assert np.all(errors <= 2e-6), errors
  # Epsilon after the bias correction (optax.adam) is another rule at these gradients
  # (seen: 0.24 .. 0.7 of a step).
  errors = _step_errors(_optax_steps(optax.adam(LR, eps=1e-7)), theirs)
  assert np.all(errors > 0.1), errors


def test_keras_adam_state_is_optax_adams():
  """Checkpoints keep their layout: the state tree of optax.adam at a schedule."""
  params = {'kernel': jnp.ones((3, 2)), 'frozen': optax.MaskedNode()}
  schedule = optax.constant_schedule(1e-3)
  ours, optax_state = keras_adam(schedule).init(params), optax.adam(schedule).init(params)
  assert jax.tree.structure(ours) == jax.tree.structure(optax_state)
  assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, optax_state)


def test_scale_by_keras_adam_skips_masked_nodes():
  params = {'kernel': jnp.ones(3), 'frozen': {'w': optax.MaskedNode()}}
  tx = scale_by_keras_adam()
  grads = {'kernel': jnp.asarray([1e-5, -1.0, 0.0]), 'frozen': {'w': optax.MaskedNode()}}
  updates, state = tx.update(grads, tx.init(params), params)
  assert updates['frozen'] == {'w': optax.MaskedNode()}
  assert state.mu['frozen'] == {'w': optax.MaskedNode()}
  # First step: m = 0.1 g and v = 0.001 g^2, times sqrt(1 - b2) / (1 - b1) with the powers
  # of float32 betas, as Keras takes them (1 - float32(0.999) = 0.00099998713).
  g = np.asarray(grads['kernel'], np.float64)
  correction = np.sqrt(1 - float(np.float32(0.999))) / (1 - float(np.float32(0.9)))
  expected = 0.1 * g * correction / (np.sqrt(0.001) * np.abs(g) + 1e-7)
  np.testing.assert_allclose(updates['kernel'], expected, rtol=1e-6)
