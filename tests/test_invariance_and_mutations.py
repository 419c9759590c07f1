"""Device-count invariance of the demo run, and two behaviours pinned against mutants.

1. The demo (configs/demo.py, mixup switched on) trained from one seed on 1 and on 8 CPU
   devices takes the same first steps; training-mode BatchNorm normalises with the
   statistics of the global batch (mean of the devices' means and of their mean squares).
2. Frozen leaves are kept out of the optimizer: it sees and updates exactly the leaves of
   the trainable view, and frozen leaves get no optimizer state and no update, not even an
   added zero (a freeze done by `optax.set_to_zero` on leaves in the view is a mutant).
3. Evaluation's centre crop of a non-square image equals Keras' (height and width swapped
   is a mutant that square images cannot see), also where the window is upsampled and the
   bilinear taps of its outermost lines must stay inside it.

Every reference is computed here, independently of the code under test: NumPy statistics,
the freeze spec's regular expression applied to the parameter paths, Keras' own layer.
"""

import dataclasses
import importlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fineflax import config as config_lib, data, models
from fineflax.data import augment as augmentation
from fineflax.data.augment import Augment
from fineflax.distributed import parallel
from fineflax.distributed.preemption import StopRequest
from fineflax.models import graph
from fineflax.train import loop, optimizers, state as state_lib, step as step_lib, training
from tests import helpers

pytestmark = pytest.mark.slow  # trains the demo on 1 and on 8 devices

# ---------------------------------------------------------------------------------------
# 1. The same run on any number of devices.
# ---------------------------------------------------------------------------------------

# The demo truncated: its first phase ('scratch': training-mode BN, Adam 3e-3, nothing
# frozen) for SCRATCH_STEPS steps, then its second ('finetune': conv1-conv4 frozen, BN in
# inference mode, Adam 3e-4) for FINETUNE_STEPS steps from there, as a run goes on.
SCRATCH_STEPS = 2
FINETUNE_STEPS = 6
# Tolerances on each step's mean loss, relative. Measured (8 devices against 1, a 2-core
# CPU, float32), and why it is not exact: on 8 devices gradients, losses and BN moments
# are sums of 8 partial sums (an all-reduce), another order of float additions, so they
# differ in their last bits; training then amplifies that.
#   scratch steps 1-2: 3e-7, 6e-6. Later scratch steps grow fast: 2e-3, 1e-2, 5e-2, 8e-2,
#     1.3e-1 at steps 3-7. That is not a device-count effect: one device started from
#     weights perturbed by 1e-7 (relative, about an ulp) departs from the unperturbed run
#     by the same amounts (2e-3 at step 3, 1.3e-1 at step 7). Adam turns the gradient of
#     a conv bias in front of training-mode BN, zero but for rounding, into a full
#     learning-rate step whose sign is that rounding, and training-mode BN from scratch
#     amplifies small differences anyway (SGD at 0.05 departs alike from step 4). So only
#     the scratch steps before that are compared, tightly.
#   finetune steps 1-6 (after the 2 scratch steps): <= 9e-5 (1e-7-perturbed weights on
#     one device: <= 2e-4); BN in inference mode, nothing amplifies.
# (Adam is blind to the scale of the gradient: a pmean where the step needs a psum passes
# here; tests/test_step.py::test_eight_devices_equal_one uses SGD for that.)
SCRATCH_RTOL = 1e-4
FINETUNE_RTOL = 1e-3


def _demo_config():
  """The demo's full config, with mixup on (the demo has dropout, but no mixup)."""
  sys.path.insert(0, str(helpers.ROOT))
  config = importlib.import_module('configs.demo').get_config()
  assert config.model.head.dropout > 0  # dropout on, as the demo has it
  assert [p.batchnorm for p in config.phases] == ['train', 'frozen']
  config.data.augment.mixup = config.data.augment.mixup or 0.4  # the demo has none
  config.report.progress = 'off'
  return config


def _first_steps(workdir, devices):
  """The mean train loss of each of the truncated demo's steps on `devices`.

  Driven through the run's own setup (`training.setup`) and phase start
  (`loop.start_state`), with the train step made as `loop` makes it and run as the loop
  runs it on a split on the devices: the epoch's plan (`data.epoch_plan`, each device's
  columns of it) placed there once, the step taking its row, the metrics one row a step
  (the run itself only logs per-epoch losses).
  """
  config = _demo_config()
  run, resume, variables = training.setup(config, workdir, devices, StopRequest())
  assert resume is None and run.mesh.devices.size == len(devices)
  losses, state = [], None
  try:
    for plan, steps in zip(run.plans, (SCRATCH_STEPS, FINETUNE_STEPS)):
      assert plan.augment.mixup > 0
      state = loop.start_state(run, plan, state, variables, None)
      train_step = step_lib.make_train_step(
          run.model,
          plan.optimizer,
          run.mesh,
          bn_train=plan.bn_train,
          seed=config.seed,
          label_smoothing=config.loss.label_smoothing,
          augment=plan.augment,
          class_weights=run.class_weights,
      )
      split, resident = run.images.splits['train'], run.images.resident['train']
      assert resident is not None  # the demo's splits live on the devices
      rng = np.random.default_rng([config.seed, plan.index, 0])  # epoch 0's order
      order = data.epoch_plan(split, config.batch_size, rng)
      placed = parallel.shard_plan({k: v[:steps] for k, v in order.items()}, run.mesh)
      inputs = {
          **resident,
          'plan_index': placed['index'],
          'plan_weight': placed['weight'],
          'start': parallel.replicate(np.asarray(int(state.step), np.int32), run.mesh),
      }
      metrics = parallel.replicate(np.zeros((steps, 3), np.float32), run.mesh)
      carry, fixed, structure = train_step.split(state)
      for _ in range(steps):
        carry, metrics = train_step.jitted(carry, fixed, {}, inputs, metrics, structure)
      state = train_step.join(carry, fixed, structure)
      rows = np.asarray(jax.device_get(metrics))
      assert (rows[:, 2] == config.batch_size).all()  # full batches: no padding rows
      losses += list(rows[:, 0] / rows[:, 2])
  finally:
    run.close()
  return np.array(losses)


@pytest.fixture(scope='module')
def demo_losses(tmp_path_factory):
  """Per-step losses of the truncated demo on 1 and on 8 devices (trained once)."""
  assert len(jax.devices()) == 8
  out = {n: _first_steps(tmp_path_factory.mktemp(f'demo_{n}'), jax.devices()[:n]) for n in (1, 8)}
  relative = np.abs(out[8] - out[1]) / out[1]
  print(
      '\n1 vs 8 devices, relative loss difference per step:',
      ' '.join(f'{i + 1}:{d:.1e}' for i, d in enumerate(relative)),
  )
  return out


def test_demo_scratch_steps_equal_on_one_and_eight_devices(demo_losses):
  """The first steps of training from scratch (training-mode BN over the global batch,
  dropout and mixup drawn from each example's global index, gradients summed over the
  devices) give one device's losses on eight, to SCRATCH_RTOL (see there)."""
  one, eight = demo_losses[1][:SCRATCH_STEPS], demo_losses[8][:SCRATCH_STEPS]
  assert np.isfinite(one).all() and one[1] < one[0]  # it trains
  np.testing.assert_allclose(eight, one, rtol=SCRATCH_RTOL)


def test_demo_finetune_steps_equal_on_one_and_eight_devices(demo_losses):
  """The fine-tuning phase that follows (a new optimizer over part of the network, BN in
  inference mode, dropout and mixup) gives the same losses step for step, to
  FINETUNE_RTOL (see there)."""
  one, eight = demo_losses[1][SCRATCH_STEPS:], demo_losses[8][SCRATCH_STEPS:]
  assert len(one) == FINETUNE_STEPS and np.isfinite(one).all()
  assert len(set(one.tolist())) == FINETUNE_STEPS  # each step a loss of its own
  np.testing.assert_allclose(eight, one, rtol=FINETUNE_RTOL)


# Covered elsewhere only indirectly: tests/test_step.py::test_eight_devices_equal_one
# compares 1- and 8-device moving statistics after a step, each computed by the code.
# Here against NumPy, on data whose device shares have different means and spreads, so
# that per-device statistics (or the mean of per-device variances) are far off.
BN_EPSILON = 1e-3  # KerasGraph's default, Keras' BatchNormalization's
BN_RTOL = 1e-5  # float32 moments of 16x4x4 values per channel against float64 NumPy


def _bn_graph():
  return graph.KerasGraph(
      layers=(
          graph.Layer('input', 'InputLayer'),
          graph.Layer('bn', 'BatchNormalization', inputs=('input',)),
      ),
      bn_axis_name=parallel.AXIS,
  )


def _bn_apply(model, variables, x, devices):
  """Training-mode BN of the global batch `x` sharded over `devices`."""
  mesh = parallel.make_mesh(devices)

  def apply(variables, x):
    y, updated = model.apply(variables, x, bn_train=frozenset({'bn'}), mutable=['batch_stats'])
    return y, updated['batch_stats']

  mapped = jax.jit(
      jax.shard_map(
          apply,
          mesh=mesh,
          in_specs=(P(), P(parallel.AXIS)),
          out_specs=(P(parallel.AXIS), P()),
          check_vma=False,
      )
  )
  y, stats = mapped(
      parallel.replicate(variables, mesh),
      jax.device_put(x, jax.sharding.NamedSharding(mesh, P(parallel.AXIS))),
  )
  return np.asarray(y), jax.tree.map(np.asarray, jax.device_get(stats))


def test_training_mode_batchnorm_uses_the_global_batch_statistics():
  """On 8 devices, training-mode BN normalises with, and moves its averages towards, the
  global batch's mean (the mean of the devices' means) and variance (the mean of their
  mean squares minus the squared mean), as one device does on the whole batch."""
  rng = np.random.default_rng(0)
  shares = [rng.normal(3.0 * d, 1.0 + d, (2, 4, 4, 3)) for d in range(8)]  # 2 rows each
  x = np.concatenate(shares).astype(np.float32)
  means = np.array([s.mean(axis=(0, 1, 2)) for s in shares])
  squares = np.array([(s**2).mean(axis=(0, 1, 2)) for s in shares])
  mean = means.mean(0)
  var = squares.mean(0) - mean**2
  # The test can tell: averaging per-device variances gives another figure.
  assert np.all(np.abs(np.mean(squares - means**2, 0) - var) > 0.5 * var)
  model = _bn_graph()
  variables = model.init(jax.random.key(0), x[:1])
  momentum = graph.BN_MOMENTUM
  expected_y = (x - mean) / np.sqrt(var + BN_EPSILON)
  expected_stats = {
      'mean': momentum * 0.0 + (1 - momentum) * mean,
      'var': momentum * 1.0 + (1 - momentum) * var,
  }
  for devices in (jax.devices()[:1], jax.devices()):
    y, stats = _bn_apply(model, variables, x, devices)
    np.testing.assert_allclose(
        y, expected_y, rtol=BN_RTOL, atol=BN_RTOL, err_msg=f'{len(devices)} devices'
    )
    for name, value in expected_stats.items():
      np.testing.assert_allclose(
          stats['bn'][name], value, rtol=BN_RTOL, err_msg=f'{name}, {len(devices)} devices'
      )


# ---------------------------------------------------------------------------------------
# 2. Frozen leaves are not in the optimizer's view at all.
# ---------------------------------------------------------------------------------------

# The demo's fine-tuning spec: part of the backbone (conv1-conv4) frozen, conv5 and the
# head train. The expected trainable set is computed from this regular expression here.
FREEZE_SPEC = 'regex:^backbone/conv[1-4]_'
FROZEN_PATTERN = re.compile(r'^backbone/conv[1-4]_')
IMAGE = (16, 16, 3)
BATCH = 8


def _paths(tree):
  """The '/'-joined dict-key paths of the array leaves of a (nested dict) tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path) for path, _ in flat]


def _spy(tx, seen):
  """`tx`, recording (at trace time) the leaf paths of what its update receives and
  returns: the gradients the optimizer sees and the updates it makes."""

  def update(updates, state, params=None):
    seen['grads'] = _paths(updates)
    seen['params'] = _paths(params)
    out, state = tx.update(updates, state, params)
    seen['updates'] = _paths(out)
    return out, state

  return optax.GradientTransformation(tx.init, update)


@pytest.fixture(scope='module')
def frozen_run():
  """Two AdamW steps (weight decay on) with FREEZE_SPEC on resnet_tiny, one device; a
  frozen bias set to -0.0, which an added zero update would turn into +0.0."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  model = models.build_model(cfg.model, 4, bn_axis_name=parallel.AXIS)
  variables = state_lib.init_variables(model, IMAGE, seed=0)
  variables['params']['backbone']['conv1_conv']['bias'] = -np.zeros(
      variables['params']['backbone']['conv1_conv']['bias'].shape, np.float32
  )
  # Weight decay moves every leaf it sees, gradient or not: a frozen leaf let into the
  # optimizer (under a zero update or a zero rate) would move under a decay applied
  # outside them.
  phase = config_lib.phase(
      freeze=FREEZE_SPEC, optimizer='adamw', learning_rate=1e-2, weight_decay=0.1
  )
  seen = {}
  opt = optimizers.make_optimizer(model, variables['params'], phase, 1)
  opt = dataclasses.replace(opt, tx=_spy(opt.tx, seen))
  labels = opt.labels
  mesh = parallel.make_mesh(jax.devices()[:1])
  train_step = step_lib.make_train_step(model, opt, mesh, seed=0)
  state = parallel.replicate(state_lib.create_train_state(variables, opt), mesh)
  before = jax.device_get(state)
  rng = np.random.default_rng(0)
  for _ in range(2):
    batch = {
        'image': rng.integers(0, 256, (BATCH,) + IMAGE, dtype=np.uint8),
        'label': rng.integers(0, 4, BATCH).astype(np.int32),
        'weight': np.ones(BATCH, np.float32),
    }
    state, _ = train_step(state, parallel.shard_batch(batch, mesh), {})
  return dict(
      params=variables['params'],
      labels=labels,
      seen=seen,
      before=before,
      after=jax.device_get(state),
  )


def _expected_split(params):
  paths = _paths(params)
  frozen = {p for p in paths if FROZEN_PATTERN.search(p)}
  return set(paths) - frozen, frozen


def test_optimizer_sees_and_updates_exactly_the_trainable_view(frozen_run):
  """The optimizer receives gradients for, and returns updates of, the leaves of the
  trainable view and no others: as many as the spec leaves trainable, by path. A freeze
  done by a zero update (`set_to_zero`) on frozen leaves inside the view would hand it
  every leaf."""
  trainable, frozen = _expected_split(frozen_run['params'])
  assert frozen and trainable and any(p.startswith('backbone/') for p in trainable)
  view = optimizers.trainable_view(frozen_run['params'], frozen_run['labels'])
  assert len(jax.tree.leaves(view)) == len(trainable)
  assert set(_paths(view)) == trainable
  seen = frozen_run['seen']
  for what in ('grads', 'params', 'updates'):
    assert len(seen[what]) == len(trainable), what
    assert set(seen[what]) == trainable, what


def test_frozen_leaves_get_no_optimizer_state_and_no_update(frozen_run):
  """AdamW's state holds a first and a second moment per trainable leaf and nothing for
  frozen ones; after two steps with weight decay every frozen leaf is bit-for-bit as it
  was (the -0.0 bias included) and every trainable leaf moved."""
  trainable, frozen = _expected_split(frozen_run['params'])
  before, after = frozen_run['before'], frozen_run['after']
  moments = [
      p for p, x in zip(_paths(after.opt_state), jax.tree.leaves(after.opt_state)) if np.ndim(x) > 0
  ]
  # Each moment leaf's path ends with the parameter path it belongs to.
  owners = [next((t for t in trainable | frozen if p.endswith('/' + t)), None) for p in moments]
  assert not [p for p, o in zip(moments, owners) if o is None or o in frozen]
  assert sorted(owners) == sorted(list(trainable) * 2)  # mu and nu, once each
  for path, b, a in zip(
      _paths(before.params), jax.tree.leaves(before.params), jax.tree.leaves(after.params)
  ):
    b, a = np.asarray(b), np.asarray(a)
    if path in frozen:
      assert np.array_equal(b.view(np.uint32), a.view(np.uint32)), f'{path} changed'
    else:
      assert not np.array_equal(b, a), f'{path} did not train'
  assert np.signbit(after.params['backbone']['conv1_conv']['bias']).all()


# ---------------------------------------------------------------------------------------
# 3. Evaluation's centre crop of a non-square image, against Keras.
# ---------------------------------------------------------------------------------------

# Both sample bilinearly at half-pixel centres in float32, on a [0, 255] scale, but compute
# the sample positions and weights differently (one affine map of output to stored pixels;
# Keras' crop, then jax.image.resize's kernel weights). Measured: <= 8.7e-4 (1.2e-3 for a
# crop of 30 resized to 30), i.e. ~4e-6 of the scale. Height and width swapped in the crop
# is off by tens.
CROP_TOLERANCE = 5e-3
CROP_SHAPES = [(37, 53), (53, 37)]  # both orientations: the long side is x, then y


def _eval_crop_and_keras(keras, shape, crop, size):
  """Evaluation's preparation of two uint8 images of `shape` with `Augment(crop=crop)` at
  model side `size`, and Keras' counterpart: RandomCrop(crop, crop) at inference as its
  documentation states it, `Resizing(crop, crop, crop_to_aspect_ratio=True)` (Keras 3's
  RandomCrop layer itself returns the image unchanged at inference), then the model's
  `Resizing(size, size)`."""
  images = np.random.default_rng(0).integers(0, 256, (2,) + shape + (3,), dtype=np.uint8)
  got = np.asarray(
      augmentation.prepare(jnp.asarray(images), None, Augment(crop=crop), size, train=False)
  )
  expected = keras.layers.Resizing(crop, crop, crop_to_aspect_ratio=True)(images.astype(np.float32))
  if crop != size:
    expected = keras.layers.Resizing(size, size)(expected)
  expected = np.asarray(expected)
  assert got.shape == expected.shape == (2, size, size, 3)
  return images, got, expected


@pytest.mark.parametrize('shape', CROP_SHAPES)
@pytest.mark.parametrize('crop, size', [(24, 24), (37, 24), (37, 37)])
def test_eval_centre_crop_of_a_non_square_image_equals_keras(keras, shape, crop, size):
  """With `crop` set, evaluation takes the largest centred window of the crop's (square)
  aspect, min(h, w) on a side, centred on the long side, and resizes it to the model's
  side: Keras' crop-then-resize, to CROP_TOLERANCE. (Where crop is neither the model's
  side nor the short side, fineflax resamples once where Keras resamples twice: not
  compared.)"""
  images, got, expected = _eval_crop_and_keras(keras, shape, crop, size)
  assert np.abs(got - expected).max() <= CROP_TOLERANCE
  if crop == size == min(shape):  # no resampling: the centred window itself, exactly
    h, w = shape
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    assert (y0, x0) in ((0, 8), (8, 0))
    np.testing.assert_array_equal(got, images[:, y0 : y0 + crop, x0 : x0 + crop])


def _long_axis_edges(shape, size):
  """Index of the first and last output lines across the long axis: (rows, cols)."""
  edges = [0, size - 1]
  return (slice(None), edges) if shape[1] > shape[0] else (edges, slice(None))


@pytest.mark.parametrize('shape', CROP_SHAPES)
def test_eval_centre_crop_upsampled_equals_keras_inside_the_window(keras, shape):
  """Upsampled (a 37-pixel window to 48): every output pixel but the first and last line
  across the long axis equals Keras' to CROP_TOLERANCE (those lines: the next test)."""
  _, got, expected = _eval_crop_and_keras(keras, shape, 48, 48)
  inside = np.ones(got.shape[1:3], bool)
  inside[_long_axis_edges(shape, 48)] = False
  assert np.abs(got - expected)[:, inside].max() <= CROP_TOLERANCE


@pytest.mark.parametrize('shape', CROP_SHAPES)
def test_eval_centre_crop_upsampled_edges_equal_keras(keras, shape):
  """The first and last output lines across the long axis of an upsampled centre crop
  equal Keras': their bilinear taps stay inside the window, as Keras crops before it
  resizes."""
  _, got, expected = _eval_crop_and_keras(keras, shape, 48, 48)
  edges = _long_axis_edges(shape, 48)
  assert (
      np.abs(got[:, edges[0], edges[1]] - expected[:, edges[0], edges[1]]).max() <= CROP_TOLERANCE
  )
