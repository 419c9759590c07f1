"""The train and eval steps: written per device, mapped over the mesh with shard_map.

Each step body is what a pmapped step would be: it sees its device's rows of the batch,
names the mesh axis `batch` in its collectives, and returns replicated results. It is
mapped over every device with `jax.shard_map` inside `jax.jit`, which is what `jax.pmap`
itself has become (JAX >= 0.8).

Losses are normalised by the global sum of example weights (padding rows weigh 0), so a
psum of per-device sums is the exact global mean whatever the padding; with no padding it
equals the pmean of per-device means. A batch whose weights sum to 0 leaves the state as
it was, but for the step count.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fineflax.data import augment as augmentation, feed
from fineflax.data.augment import Augment
from fineflax.data.dataset import Split, eval_batches
from fineflax.distributed.parallel import AXIS
from fineflax.run.progress import METRICS
from fineflax.train import ema as ema_lib, freeze
from fineflax.train.ema import Ema
from fineflax.train.optimizers import Optimizer
from fineflax.train.state import TrainState

Metrics = dict[str, jax.Array]  # sums over the examples of a step: loss, correct, count


def per_example_loss(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Loss and correctness per example.

  One logit column means a binary classifier (sigmoid cross-entropy on logits, accuracy
  at logit 0); otherwise softmax cross-entropy with optional label smoothing.
  """
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    logits = logits[:, 0]
    targets = labels.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(logits, targets)
    correct = (logits > 0) == (labels > 0)
  else:
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
      targets = optax.smooth_labels(targets, label_smoothing)
    loss = optax.softmax_cross_entropy(logits, targets)
    correct = jnp.argmax(logits, -1) == labels
  return loss, correct.astype(jnp.float32)


def _sums(loss: jax.Array, correct: jax.Array, weight: jax.Array) -> Metrics:
  return jax.lax.psum(
      {
          'loss': jnp.sum(loss * weight),
          'correct': jnp.sum(correct * weight),
          'count': jnp.sum(weight),
      },
      AXIS,
  )


def _inputs(batch: dict[str, jax.Array], data: dict[str, jax.Array]):
  """Images and labels of a batch: given, or gathered from a device-resident split."""
  if 'index' in batch:
    return data['image'][batch['index']], data['label'][batch['index']]
  return batch['image'], batch['label']


def _train_inputs(batch: dict[str, jax.Array], data: dict[str, jax.Array], row: jax.Array):
  """Images, labels and weights of a train step: the batch's, or row `row` of the epoch's
  plan gathered from the device-resident split."""
  if 'plan_index' in data:
    index = jax.lax.dynamic_index_in_dim(data['plan_index'], row, keepdims=False)
    weight = jax.lax.dynamic_index_in_dim(data['plan_weight'], row, keepdims=False)
    return data['image'][index], data['label'][index], weight
  images, targets = _inputs(batch, data)
  return images, targets, batch['weight']


def _global_ids(local_batch: int) -> jax.Array:
  """The indices in the global batch of this device's rows."""
  return jax.lax.axis_index(AXIS) * local_batch + jnp.arange(local_batch)


def _example_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """One key per example, from its index in the global batch: augmentation and dropout do
  not depend on how many devices share the batch."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


Structure = tuple[Any, Any]  # the tree structures of a state's carry and fixed part


@dataclasses.dataclass(frozen=True)
class TrainStep:
  """A phase's train step, and the split of the train state it runs on.

  A step changes only the *carry*: the step count, the trainable parameters (the
  optimizer's view), the optimizer state, the moving average if any and, with
  training-mode BatchNorm, the statistics. The carry is donated and returned; the frozen
  parameters (and frozen statistics) go in as `fixed`, neither donated nor returned. Both
  cross each call as flat lists of arrays, their tree structures a static argument: what a
  call hands over is what the step changes and nothing it would have to walk (every array
  and tree node crossing a call costs host time on each step; ResNet50's head mode changes
  9 of its 327 state arrays).

  `jitted(carry, fixed, batch, data, metrics, structure) -> (carry, metrics)`:
    carry, fixed: the leaves of `split(state)`; structure: their tree structures;
    batch: this step's rows ({'image', 'label', 'weight'}, or {'index', 'weight'} into a
      device-resident split), or {} when `data` holds the epoch's plan;
    data: {'start'}: the step count before row 0 of `metrics`; with a device-resident
      split also its 'image' and 'label', and the epoch's plan 'plan_index' and
      'plan_weight' ((steps, global batch) index and weight rows, sharded on the batch
      axis), from which the step takes row `step - start`: no batch crosses per step;
    metrics: (steps, 3) float32 (`METRICS` columns); the step writes its sums over the
      global batch into row `step - start`, so the host fetches one array, when it wants.
  """

  optimizer: Optimizer
  bn_train: frozenset[str]
  jitted: Callable[..., tuple[list[jax.Array], jax.Array]]
  ema: Ema | None = None

  def split(self, state: TrainState) -> tuple[list[Any], list[Any], Structure]:
    """The leaves of `state`'s carry and fixed part, and their structures."""
    carry = {
        'step': state.step,
        'params': self.optimizer.trainable(state.params),
        'opt_state': state.opt_state,
    }
    fixed = {'params': self.optimizer.frozen(state.params)}
    (carry if self.bn_train else fixed)['batch_stats'] = state.batch_stats
    if self.ema is not None:
      carry['ema'] = state.ema
    carry_leaves, carry_def = jax.tree.flatten(carry)
    fixed_leaves, fixed_def = jax.tree.flatten(fixed)
    return carry_leaves, fixed_leaves, (carry_def, fixed_def)

  def join(self, carry: list[Any], fixed: list[Any], structure: Structure) -> TrainState:
    """The train state of a carry and its fixed part."""
    carry, fixed = (d.unflatten(leaves) for d, leaves in zip(structure, (carry, fixed)))
    stats = carry['batch_stats'] if self.bn_train else fixed['batch_stats']
    return TrainState(
        step=carry['step'],
        opt_state=carry['opt_state'],
        batch_stats=stats,
        params=self.optimizer.merge(carry['params'], fixed['params']),
        ema=carry.get('ema'),
    )

  def __call__(
      self, state: TrainState, batch: dict[str, jax.Array], data: dict[str, jax.Array] | None = None
  ) -> tuple[TrainState, Metrics]:
    """One step on `state` (donated) and `batch` (`data`: a device-resident split, if the
    batch holds indices); returns the new state and the step's metric sums."""
    carry, fixed, structure = self.split(state)
    metrics = jax.device_put(jnp.zeros((1, len(METRICS)), jnp.float32), state.step.sharding)
    # A copy: the step count itself is donated with the carry.
    data = dict(data or {}, start=jnp.copy(state.step))
    carry, metrics = self.jitted(carry, fixed, batch, data, metrics, structure)
    return self.join(carry, fixed, structure), dict(zip(METRICS, metrics[0]))

  def compile(
      self,
      state: TrainState,
      batch: dict[str, jax.Array],
      data: dict[str, jax.Array],
      metrics: jax.Array,
  ) -> CompiledTrainStep:
    """The step compiled for `state`'s structure and these inputs' shapes."""
    carry, fixed, structure = self.split(state)
    compiled = self.jitted.lower(carry, fixed, batch, data, metrics, structure).compile()
    return CompiledTrainStep(self, structure, compiled)


@dataclasses.dataclass(frozen=True)
class CompiledTrainStep:
  """A train step compiled for one state structure and input shapes (what the training
  loop runs): `run(carry, fixed, batch, data, metrics) -> (carry, metrics)`."""

  step: TrainStep
  structure: Structure
  run: Callable[..., tuple[list[jax.Array], jax.Array]]

  def split(self, state: TrainState) -> tuple[list[Any], list[Any]]:
    """The leaves of `state`'s carry and fixed part."""
    carry, fixed, structure = self.step.split(state)
    if structure != self.structure:
      raise ValueError('the state has another structure than the step was compiled for')
    return carry, fixed

  def join(self, carry: list[Any], fixed: list[Any]) -> TrainState:
    """The train state of a carry and its fixed part."""
    return self.step.join(carry, fixed, self.structure)


def make_train_step(
    model: nn.Module,
    optimizer: Optimizer,
    mesh: Mesh,
    *,
    bn_train: frozenset[str] = frozenset(),
    seed: int = 0,
    label_smoothing: float = 0.0,
    augment: Augment = Augment(),
    class_weights: Sequence[float] | None = None,
    on_features: bool = False,
    ema: Ema | None = None,
) -> TrainStep:
  """The phase's train step over the mesh (`TrainStep`).

  Args:
    model: the classifier; built with `bn_axis_name=AXIS` when `bn_train` is not empty.
    optimizer: the phase's optimizer; only the leaves of its trainable view are
      differentiated and updated.
    mesh: the device mesh (axis `batch`).
    bn_train: BatchNormalization layers that run in training mode (empty: all frozen, and
      `batch_stats` pass through untouched). Stochastic depth (config.model.drop_path)
      drops the branches of the blocks that train (`freeze.stochastic_depth_layers`).
    seed: augmentation, mixup and dropout are functions of (seed, step, global example
      index): the same on any number of devices.
    augment: the augmentations, applied on the device before the model.
    class_weights: Keras `class_weight`: each example's loss times its class's weight
      (the mean is still over examples, as Keras does). The reported train loss is that
      weighted loss, as Keras reports it; accuracy and evaluation are unweighted.
    on_features: the batches hold cached features (`Classifier.features`), and the step
      runs only the rest of the head (`Classifier.classify`); no augmentation.
    ema: the moving average the step updates after the optimizer (the state's `ema`).
  """

  if on_features and (augment.geometric or augment.crop is not None or augment.mixup > 0):
    raise ValueError('cached features cannot be augmented')
  method = 'classify' if on_features else None
  drop_paths = freeze.stochastic_depth_layers(optimizer.labels, model.layer_groups())

  def weigh(targets: jax.Array) -> jax.Array:
    if class_weights is None:
      return jnp.ones(targets.shape, jnp.float32)
    return jnp.asarray(class_weights, jnp.float32)[targets.astype(jnp.int32)]

  def step(
      carry: dict[str, Any],
      fixed: dict[str, Any],
      batch: dict[str, jax.Array],
      data: dict[str, jax.Array],
      metrics: jax.Array,
  ) -> tuple[dict[str, Any], jax.Array]:
    row = carry['step'] - data['start']
    images, targets, weight = _train_inputs(batch, data, row)
    trainable = carry['params']
    stats = carry['batch_stats'] if bn_train else fixed['batch_stats']
    total = jax.lax.psum(jnp.sum(weight), AXIS)
    has_examples = total > 0
    base = jax.random.fold_in(jax.random.key(seed), carry['step'])
    local_batch = images.shape[0]
    ids = _global_ids(local_batch)
    augment_key = jax.random.fold_in(base, 0)
    prepare = (
        lambda x, rows: x
        if on_features
        else augmentation.prepare(
            x, _example_keys(augment_key, rows), augment, model.image_size, train=True
        )
    )
    raw, images = images, prepare(images, ids)
    if augment.mixup > 0:
      # Partners come from the whole global batch: their stored images and labels are
      # gathered from every device and prepared here with their own keys.
      partner, lam = augmentation.mixup_draws(
          jax.random.fold_in(base, 1), augment.mixup, local_batch * mesh.devices.size, ids
      )
      everyone = jax.lax.all_gather(raw, AXIS, tiled=True)
      images = augmentation.mix(images, prepare(everyone[partner], partner), lam)
      partner_targets = jax.lax.all_gather(targets, AXIS, tiled=True)[partner]
    dropout_keys = _example_keys(jax.random.fold_in(base, 2), ids)

    def loss_fn(trainable_params):
      variables = {
          'params': optimizer.merge(trainable_params, fixed['params']),
          'batch_stats': stats,
      }
      if bn_train:
        logits, updated = model.apply(
            variables,
            images,
            train=True,
            bn_train=bn_train,
            example_keys=dropout_keys,
            stochastic_depth=drop_paths,
            mutable=['batch_stats'],
            method=method,
        )
        new_stats = updated['batch_stats']
      else:
        logits = model.apply(
            variables,
            images,
            train=True,
            example_keys=dropout_keys,
            stochastic_depth=drop_paths,
            method=method,
        )
        new_stats = stats
      loss, correct = per_example_loss(logits, targets, label_smoothing)
      loss = loss * weigh(targets)
      if augment.mixup > 0:
        loss = lam * loss + (1 - lam) * per_example_loss(logits, partner_targets, label_smoothing)[
            0
        ] * weigh(partner_targets)
      return jnp.sum(loss * weight) / total, (new_stats, loss, correct)

    grads, (new_stats, loss, correct) = jax.grad(loss_fn, has_aux=True)(trainable)
    grads = jax.lax.psum(grads, AXIS)
    updates, opt_state = optimizer.tx.update(grads, carry['opt_state'], trainable)
    # A batch of padding only (weights summing to 0: uneven shares, skipped files) takes
    # no step: its gradients are 0/0, and even a zero gradient would move Adam's moments.
    unchanged_if_empty = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(has_examples, n, o), new, old
    )
    new_carry = {
        'step': carry['step'] + 1,
        'params': unchanged_if_empty(optax.apply_updates(trainable, updates), trainable),
        'opt_state': unchanged_if_empty(opt_state, carry['opt_state']),
    }
    if bn_train:
      new_carry['batch_stats'] = unchanged_if_empty(new_stats, stats)
    if ema is not None:
      average = carry['ema']
      current = {'params': new_carry['params']}
      if 'batch_stats' in average:
        current['batch_stats'] = ema_lib.trained_stats(new_carry['batch_stats'], bn_train)
      moved = ema.update(average, current, carry['step'])
      new_carry['ema'] = unchanged_if_empty(moved, average)
    sums = _sums(loss, correct, weight)
    values = jnp.stack([sums[name] for name in METRICS]).astype(metrics.dtype)
    return new_carry, jax.lax.dynamic_update_index_in_dim(metrics, values, row, 0)

  def run(carry, fixed, batch, data, metrics, structure):
    carry, fixed = (d.unflatten(leaves) for d, leaves in zip(structure, (carry, fixed)))
    # The plan's rows are sharded on the batch axis, the rest of `data` replicated; the
    # specs follow the keys the call brings, so one function serves every input form.
    data_specs = {k: P(None, AXIS) if k.startswith('plan_') else P() for k in data}
    mapped = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(P(), P(), P(AXIS), data_specs, P()),
        out_specs=(P(), P()),
        check_vma=False,
    )
    carry, metrics = mapped(carry, fixed, batch, data, metrics)
    return jax.tree.leaves(carry), metrics

  jitted = jax.jit(run, donate_argnums=0, static_argnums=5)
  return TrainStep(optimizer, frozenset(bn_train), jitted, ema)


def make_eval_step(
    model: nn.Module,
    mesh: Mesh,
    *,
    label_smoothing: float = 0.0,
    augment: Augment = Augment(),
    on_features: bool = False,
) -> Callable[..., Metrics]:
  """A jitted `(variables, batch, data) -> metric sums`; weight-0 rows count nothing.

  It takes `state.variables` rather than the state, so one compilation serves every phase.
  No augmentation, except that a random crop becomes Keras' centre crop. `on_features`:
  the batches hold cached features (see make_train_step).
  """

  def step(
      variables: dict[str, Any], batch: dict[str, jax.Array], data: dict[str, jax.Array]
  ) -> Metrics:
    images, targets = _inputs(batch, data)
    if on_features:
      logits = model.apply(variables, images, train=False, method='classify')
    else:
      images = augmentation.prepare(images, None, augment, model.image_size, train=False)
      logits = model.apply(variables, images, train=False)
    loss, correct = per_example_loss(logits, targets, label_smoothing)
    return _sums(loss, correct, batch['weight'])

  mapped = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False
  )
  return jax.jit(mapped)


def make_features_step(
    model: nn.Module, mesh: Mesh, *, augment: Augment = Augment()
) -> Callable[..., jax.Array]:
  """A jitted `(variables, batch, data) -> features` (`Classifier.features`), sharded over
  the batch like the batch itself: what cached-feature mode stores."""

  def step(
      variables: dict[str, Any], batch: dict[str, jax.Array], data: dict[str, jax.Array]
  ) -> jax.Array:
    images, _ = _inputs(batch, data)
    images = augmentation.prepare(images, None, augment, model.image_size, train=False)
    return model.apply(variables, images, method='features')

  mapped = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(AXIS), P()), out_specs=P(AXIS), check_vma=False
  )
  return jax.jit(mapped)


def total(sums: list[Metrics | dict[str, float]]) -> dict[str, float]:
  """The step sums added up on the host (one device->host transfer)."""
  if not sums:
    return {'loss': 0.0, 'correct': 0.0, 'count': 0.0}
  return jax.tree.map(lambda *xs: sum(float(x) for x in xs), *jax.device_get(sums))


def summarize(sums: list[Metrics | dict[str, float]]) -> dict[str, float]:
  """Loss and accuracy over a list of step sums."""
  if not sums:
    return {'loss': float('nan'), 'accuracy': float('nan'), 'count': 0}
  total_ = total(sums)
  count = max(total_['count'], 1.0)
  return {
      'loss': total_['loss'] / count,
      'accuracy': total_['correct'] / count,
      'count': int(round(total_['count'])),
  }


def evaluate(
    eval_step: Callable[..., Metrics],
    variables: dict[str, Any],
    split: Split,
    batch_size: int,
    mesh: Mesh,
    resident: dict[str, jax.Array] | None = None,
) -> dict[str, float]:
  """Loss, accuracy and example count of `variables` on `split`.

  The last batch is padded with weight-0 rows, so no example is dropped or counted twice,
  whatever the batch size and the number of devices and processes.
  """
  batches = feed.device_batches(split, eval_batches(split, batch_size), mesh, resident)
  return summarize([eval_step(variables, b, resident or {}) for b in batches])
