"""The train and eval steps: frozen means bit-for-bit, data parallel means device-count
independent. (Evaluation counting every example once, on 1 and 8 devices:
tests/test_data.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fineflax import config as config_lib, data, models, pytree
from fineflax.data import augment as augmentation
from fineflax.data.augment import Augment
from fineflax.distributed import parallel
from fineflax.train import freeze, state as state_lib, step as step_lib
from tests import helpers

pytestmark = pytest.mark.slow  # compiles and runs train steps on 1 to 8 devices

IMAGE = (16, 16, 3)
BATCH = 16
CONV5 = 'layers[:43]'  # resnet_tiny's conv1..conv4 (its conv5_block1_1_conv is layers[43])


def _setup(
    spec,
    batchnorm='frozen',
    devices=None,
    optimizer='adam',
    learning_rate=1e-2,
    dropout=0.5,
    num_classes=4,
    image=IMAGE,
    augment=Augment(),
    dtype=jnp.float32,
):
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  cfg.model.head.update(dropout=dropout, batchnorm=True)
  model = models.build_model(cfg.model, num_classes, bn_axis_name=parallel.AXIS, dtype=dtype)
  variables = state_lib.init_variables(model, image, seed=0)
  opt = helpers.phase_optimizer(
      model,
      variables['params'],
      spec,
      optimizer=optimizer,
      learning_rate=learning_rate,
      momentum=0.0 if optimizer == 'adam' else 0.9,
  )
  labels = opt.labels
  mesh = parallel.make_mesh(devices)
  bn_train = (
      freeze.bn_train_layers(labels, model.layer_groups()) if batchnorm == 'train' else frozenset()
  )
  train_step = step_lib.make_train_step(
      model, opt, mesh, bn_train=bn_train, seed=0, augment=augment
  )
  state = parallel.replicate(state_lib.create_train_state(variables, opt), mesh)
  return model, labels, mesh, state, train_step


def _batches(n, num_classes=4, seed=0, image=IMAGE):
  rng = np.random.default_rng(seed)
  return [
      {
          'image': rng.integers(0, 256, (BATCH,) + image, dtype=np.uint8),
          'label': rng.integers(0, num_classes, BATCH).astype(np.int32),
          'weight': np.ones(BATCH, np.float32),
      }
      for _ in range(n)
  ]


def _run(state, train_step, mesh, batches):
  metrics = []
  for batch in batches:
    state, m = train_step(state, parallel.shard_batch(batch, mesh), {})
    metrics.append(m)
  return state, jax.device_get(metrics)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.dtype(f'u{x.dtype.itemsize}'))


def _pairs(before, after, labels=None):
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  flat_l = jax.tree.leaves(labels) if labels is not None else [None] * len(flat_a)
  return [(pytree.path_str(p), b, a, label) for (p, b), a, label in zip(flat_b, flat_a, flat_l)]


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_frozen_leaves_and_batch_stats_are_bit_identical(dtype):
  """In float32 and in bfloat16 compute; in both the state stays float32 (bf16 is only
  what the layers compute in) and the reported loss is float32."""
  model, labels, mesh, state, train_step = _setup(CONV5, dtype=dtype)
  # -0.0 in a frozen leaf: adding a zero update would turn it into +0.0.
  params = state.params
  bias = params['backbone']['conv1_conv']['bias']
  params['backbone']['conv1_conv']['bias'] = -jnp.zeros_like(bias)
  state = parallel.replicate(state.replace(params=params), mesh)
  before = jax.device_get(state)
  state, metrics = _run(state, train_step, mesh, _batches(3))
  after = jax.device_get(state)
  assert int(after.step) == 3
  images = _batches(1)[0]['image'][:2]
  assert model.apply(after.variables, images, method='features').dtype == dtype  # computed in
  assert model.apply(after.variables, images).dtype == jnp.float32  # logits
  floats = jax.tree.leaves((after.params, after.batch_stats, after.opt_state))
  assert {str(x.dtype) for x in floats} == {'float32', 'int32'}  # int32: Adam's counts
  assert all(m['loss'].dtype == np.float32 and np.isfinite(m['loss']) for m in metrics)
  n_frozen = n_trainable = 0
  for path, b, a, label in _pairs(before.params, after.params, labels):
    if label == freeze.FROZEN:
      n_frozen += 1
      assert np.array_equal(_bits(b), _bits(a)), path
    else:
      n_trainable += 1
      assert not np.array_equal(b, a), f'{path} did not train'
  assert n_frozen and n_trainable
  assert np.signbit(after.params['backbone']['conv1_conv']['bias']).all()
  for path, b, a, _ in _pairs(before.batch_stats, after.batch_stats):
    assert np.array_equal(_bits(b), _bits(a)), path


def test_training_mode_bn_updates_only_trainable_layers():
  model, labels, mesh, state, train_step = _setup(CONV5, batchnorm='train')
  before = jax.device_get(state)
  state, _ = _run(state, train_step, mesh, _batches(2))
  after = jax.device_get(state)
  bn_train = freeze.bn_train_layers(labels, model.layer_groups())
  for path, b, a, _ in _pairs(before.batch_stats, after.batch_stats):
    layer = '/'.join(path.split('/')[:2])
    if layer in bn_train:
      assert not np.array_equal(b, a), f'{path} was not updated'
    else:
      assert np.array_equal(_bits(b), _bits(a)), path
  for path, b, a, label in _pairs(before.params, after.params, labels):
    if label == freeze.FROZEN:
      assert np.array_equal(_bits(b), _bits(a)), path


# Training-mode BN from scratch: one step at 32x32. Its batch statistics come from a
# cross-device sum of another order than on one device, and from-scratch training
# amplifies that float32 rounding step after step (seen here: 2e-6 after one step, 2e-5
# after three). At 16x16 conv4/conv5 are 1x1, so BN normalises 16 values per channel, of
# which ReLU leaves some channels nearly constant: 1 / sqrt(var + eps) then blows the
# rounding up to 1e-2 for one random draw of weights (2 and 4 devices agreed to 1e-6 there).
# One step checks what matters: pmean'd gradients and BN statistics.
# With augmentation, dropout and mixup: each example's transform, dropout mask, mixup
# weight and partner (from the whole global batch) come from its index in the global
# batch, so they are the same on 1 and 8 devices.
@pytest.mark.parametrize(
    'spec, batchnorm, steps, image, augment, dropout',
    [
        (CONV5, 'frozen', 3, IMAGE, Augment(), 0.0),
        ('none', 'train', 1, (32, 32, 3), Augment(), 0.0),
        (CONV5, 'frozen', 2, IMAGE, Augment(flip='horizontal', rotation=0.1, zoom=0.2), 0.0),
        (CONV5, 'frozen', 2, IMAGE, Augment(flip='horizontal', rotation=0.1, mixup=0.4), 0.5),
    ],
)
def test_eight_devices_equal_one(spec, batchnorm, steps, image, augment, dropout):
  """Same losses and parameters on 1 and 8 devices (tolerance 1e-5).

  SGD, so that parameter differences show gradient differences directly (Adam's
  normalisation would amplify rounding noise in near-zero gradients).
  """
  assert len(jax.devices()) == 8
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    _, _, mesh, state, train_step = _setup(
        spec,
        batchnorm,
        devices,
        optimizer='sgd',
        learning_rate=0.05,
        dropout=dropout,
        image=image,
        augment=augment,
    )
    state, metrics = _run(state, train_step, mesh, _batches(steps, image=image))
    results.append((jax.device_get(state), metrics))
  (one, m1), (eight, m8) = results
  for a, b in zip(m1, m8):
    np.testing.assert_allclose(a['loss'] / BATCH, b['loss'] / BATCH, rtol=1e-5)
    assert a['count'] == b['count'] == BATCH
  for path, a, b, _ in _pairs(one.params, eight.params):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=path)
  for path, a, b, _ in _pairs(one.batch_stats, eight.batch_stats):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=path)


def test_losses():
  logits = jnp.array([[2.0], [-1.0], [0.5]])
  labels = jnp.array([1, 1, 0])
  loss, correct = step_lib.per_example_loss(logits, labels)
  p = 1 / (1 + np.exp(-np.array([2.0, -1.0, 0.5])))
  np.testing.assert_allclose(loss, [-np.log(p[0]), -np.log(p[1]), -np.log(1 - p[2])], rtol=1e-6)
  np.testing.assert_array_equal(correct, [1, 0, 0])

  logits = jnp.array([[1.0, 2.0, 0.0]])
  loss, correct = step_lib.per_example_loss(logits, jnp.array([1]), label_smoothing=0.3)
  log_p = jax.nn.log_softmax(logits)[0]
  target = np.array([0.1, 0.8, 0.1])  # 0.3 spread over 3 classes
  np.testing.assert_allclose(loss[0], -(target * log_p).sum(), rtol=1e-6)
  assert correct[0] == 1


def test_train_batches_see_every_example_once_and_pad_with_weight_zero():
  n = 37
  split = data.Split(np.zeros((n,) + IMAGE, np.uint8), np.arange(n, dtype=np.int32))
  batches = [
      data.gather(split, b) for b in data.train_batches(split, BATCH, np.random.default_rng(0))
  ]
  assert len(batches) == 3
  seen = np.concatenate([b['label'][b['weight'] > 0] for b in batches])
  assert sorted(seen) == list(range(n))
  assert batches[-1]['weight'].sum() == n - 2 * BATCH
  again = [
      data.gather(split, b) for b in data.train_batches(split, BATCH, np.random.default_rng(0))
  ]
  assert all(np.array_equal(a['label'], b['label']) for a, b in zip(batches, again))


def test_a_batch_of_padding_only_leaves_the_state_as_it_was():
  """Weights summing to 0 (a process's share ran out, files were skipped): no NaN, and no
  update of parameters, Adam's moments or training-mode BN statistics, on any device."""
  model, labels, mesh, state, train_step = _setup(
      'none', batchnorm='train', devices=jax.devices()[:2]
  )
  state, _ = _run(state, train_step, mesh, _batches(1))  # Adam's moments are not zero
  before = jax.device_get(state)
  empty = dict(_batches(1, seed=1)[0], weight=np.zeros(BATCH, np.float32))
  state, metrics = _run(state, train_step, mesh, [empty])
  after = jax.device_get(state)
  assert int(after.step) == 2
  assert metrics[0]['count'] == 0 and metrics[0]['loss'] == 0 and metrics[0]['correct'] == 0
  for path, b, a, _ in (
      _pairs(before.params, after.params)
      + _pairs(before.batch_stats, after.batch_stats)
      + _pairs(before.opt_state, after.opt_state)
  ):
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=path)
  state, metrics = _run(state, train_step, mesh, _batches(1, seed=2))  # and then trains on
  assert np.isfinite(metrics[0]['loss']) and metrics[0]['count'] == BATCH
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))


def _smoothed_cross_entropy(
    logits: np.ndarray, labels: np.ndarray, smoothing: float, num_classes: int
) -> np.ndarray:
  """Per-example softmax cross-entropy against (1 - s) one-hot + s / classes, in NumPy."""
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  targets = np.full(logits.shape, smoothing / num_classes)
  targets[np.arange(len(labels)), labels] += 1 - smoothing
  return -(targets * log_p).sum(-1)


def test_label_smoothing_is_the_loss_of_training_and_of_evaluation():
  """With label_smoothing 0.3 the train step (learning rate 0: the parameters the loss
  was computed with stay) and the eval step report the smoothed cross-entropy."""
  model, labels, mesh, state, _ = _setup(CONV5, dropout=0.0, devices=jax.devices()[:1])
  opt = helpers.phase_optimizer(model, state.params, CONV5, optimizer='sgd', learning_rate=1e-30)
  state = parallel.replicate(
      state_lib.create_train_state(jax.device_get(state.variables), opt), mesh
  )
  train_step = step_lib.make_train_step(model, opt, mesh, label_smoothing=0.3)
  eval_step = step_lib.make_eval_step(model, mesh, label_smoothing=0.3)
  batch = _batches(1)[0]
  logits = np.asarray(model.apply(jax.device_get(state.variables), batch['image']))
  expected = _smoothed_cross_entropy(logits, batch['label'], 0.3, 4).sum()
  unsmoothed = _smoothed_cross_entropy(logits, batch['label'], 0.0, 4).sum()
  assert abs(expected - unsmoothed) > 0.1  # the smoothing is visible at this size
  got_eval = eval_step(state.variables, parallel.shard_batch(batch, mesh), {})
  np.testing.assert_allclose(float(got_eval['loss']), expected, rtol=1e-5)
  _, got_train = train_step(state, parallel.shard_batch(batch, mesh), {})
  np.testing.assert_allclose(float(got_train['loss']), expected, rtol=1e-5)


def test_mixup_loss_weighs_own_and_partner_labels_by_each_examples_weight():
  """The reported loss of a mixup step is sum(w * CE(own) + (1 - w) * CE(partner)) over the
  logits of the mixed images, with each example's weight and partner drawn as documented
  (fineflax.data.augment.mixup_draws with the step's key)."""
  model, labels, mesh, state, train_step = _setup(
      CONV5, dropout=0.0, devices=jax.devices()[:1], augment=Augment(mixup=0.4)
  )
  batch = _batches(1)[0]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 1)  # seed 0, step 0
  partner, lam = augmentation.mixup_draws(key, 0.4, BATCH, jnp.arange(BATCH))
  partner, lam = np.asarray(partner), np.asarray(lam, np.float64)
  images = batch['image'].astype(np.float32)
  mixed = lam[:, None, None, None] * images + (1 - lam[:, None, None, None]) * images[partner]
  logits = np.asarray(model.apply(jax.device_get(state.variables), mixed.astype(np.float32)))
  own = _smoothed_cross_entropy(logits, batch['label'], 0.0, 4)
  other = _smoothed_cross_entropy(logits, batch['label'][partner], 0.0, 4)
  expected = float(np.sum(lam * own + (1 - lam) * other))
  halves = float(np.sum(0.5 * own + 0.5 * other))
  assert abs(expected - halves) > 1e-3  # the weights matter at this size
  _, metrics = train_step(state, parallel.shard_batch(batch, mesh), {})
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-4)
