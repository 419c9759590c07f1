"""Evaluation at its edges, on the eight CPU devices: fewer examples than devices, a single
example, an eval batch unlike the training batch, a split of no examples.

In each case every example counts exactly once and the loss and accuracy are the exact
means over the examples. The reference is NumPy's, from the logits the model gives each
example alone (a batch of one on one device), not from the evaluation code itself.
(37 examples in batches of 16 on 1 and 8 devices: tests/test_data.py; several
processes: tests/test_multiprocess.py.)
"""

import jax
import numpy as np
import pytest

from fineflax import config as config_lib, data, models, train
from fineflax.distributed import parallel
from fineflax.errors import ConfigError, DataError
from fineflax.inference import evaluate as evaluate_lib
from fineflax.train import state as state_lib, step as step_lib

IMAGE = (8, 8, 3)
CLASSES = 3
POOL = 29  # examples the cases draw from: 24 + 5, one full eval batch of 24 and a bit
# The step sums float32 losses per device and psums them; the reference is float64 over
# the examples: they agree to float32 rounding of sums of a few dozen terms.
LOSS_RTOL = 1e-5


class Case:
  """The model, its replicated variables and compiled eval step on all eight devices, and
  the pool of examples with each one's reference loss and correctness."""

  def __init__(self):
    assert jax.device_count() == 8  # conftest's virtual CPU devices
    cfg = config_lib.default_config()
    cfg.model.backbone = 'resnet_tiny'
    cfg.model.preprocessing = 'tf'
    self.model = models.build_model(cfg.model, CLASSES, bn_axis_name=parallel.AXIS)
    host_variables = state_lib.init_variables(self.model, IMAGE, seed=0)
    self.mesh = parallel.make_mesh()
    self.variables = parallel.replicate(host_variables, self.mesh)
    self.eval_step = step_lib.make_eval_step(self.model, self.mesh)
    self.calls = 0  # eval steps run, across the cases

    rng = np.random.default_rng(3)
    self.images = rng.integers(0, 256, (POOL,) + IMAGE, dtype=np.uint8)
    # Each example alone, on one device, in float64 from there on.
    one = jax.devices()[0]
    single = jax.jit(lambda v, x: self.model.apply(v, x, train=False))
    on_one = jax.device_put(host_variables, one)
    self.logits = np.concatenate(
        [
            np.asarray(
                single(on_one, jax.device_put(self.images[i : i + 1].astype(np.float32), one)),
                np.float64,
            )
            for i in range(POOL)
        ]
    )
    predicted = self.logits.argmax(-1)
    # Every other example labelled as the model predicts it, so that accuracy lies strictly
    # between 0 and 1 and moves if an example is dropped or counted twice. Example 0 (what
    # the padding rows of a batch repeat) is predicted right: a padding row that counted
    # would raise the accuracy and pull the loss towards example 0's.
    self.labels = np.where(np.arange(POOL) % 2 == 0, predicted, (predicted + 1) % CLASSES).astype(
        np.int32
    )

  def split(self, n: int) -> data.Split:
    return data.Split(self.images[:n], self.labels[:n])

  def reference(self, n: int) -> dict[str, float]:
    """Mean softmax cross-entropy and argmax accuracy of the first n examples, in NumPy."""
    logits, labels = self.logits[:n], self.labels[:n]
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_p[np.arange(n), labels]
    return {
        'loss': float(loss.mean()),
        'accuracy': float(np.mean(logits.argmax(-1) == labels)),
        'count': n,
    }

  def evaluate(self, n: int, batch_size: int) -> dict[str, float]:
    def counted(*args):
      self.calls += 1
      return self.eval_step(*args)

    return step_lib.evaluate(counted, self.variables, self.split(n), batch_size, self.mesh)


@pytest.fixture(scope='module')
def case():
  return Case()


def _check(got, want):
  assert got['count'] == want['count']
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=LOSS_RTOL)
  # Sums of 0/1 over a few examples, divided by the count: exact in float64.
  assert got['accuracy'] == want['accuracy']


def test_fewer_examples_than_devices(case):
  """3 examples in a global batch of 8 on 8 devices: one row a device, five devices hold
  padding only, and their weight-0 rows add nothing to the loss, accuracy or count."""
  want = case.reference(3)
  assert 0 < want['accuracy'] < 1
  _check(case.evaluate(3, 8), want)


def test_a_single_example(case):
  """One example: one batch, seven of its eight rows padding (repeating that example)."""
  _check(case.evaluate(1, 8), case.reference(1))


def test_an_eval_batch_unlike_the_training_batch(case):
  """The eval batch size is free of the training batch (`config.eval_batch_size`), but
  like it must divide over the devices. With 16 for training in mind: 24 (one full batch
  of the 29 examples, then 5 examples and 19 padding rows) and 8 (three full batches, then
  5 examples): the same exact means either way."""
  want = case.reference(POOL)
  assert 0 < want['accuracy'] < 1
  _check(case.evaluate(POOL, 24), want)
  _check(case.evaluate(POOL, 8), want)


def test_an_eval_batch_that_does_not_divide_over_the_devices_is_refused(tmp_path):
  """An eval batch of 5 on 8 devices cannot be sharded: training says so before it
  compiles a step or writes anything, and `evaluate_run` says so for --batch_size (its
  default, the run's eval batch, it rounds up to a multiple of the devices)."""
  assert jax.device_count() == 8
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.data.max_examples = 16
  cfg.batch_size, cfg.eval_batch_size = 16, 5
  workdir = tmp_path / 'run'
  with pytest.raises(
      ValueError,
      match=r'^config.eval_batch_size=5 does not split evenly '
      r'over 8 devices; use a multiple of 8$',
  ):
    train.train_and_evaluate(cfg, workdir)
  assert not workdir.exists()
  with pytest.raises(
      ConfigError, match=r'--batch_size=5: must be a positive multiple of the 8 ' 'devices'
  ):
    evaluate_lib.eval_batch_size(5, cfg, 8)
  assert evaluate_lib.eval_batch_size(None, cfg, 8) == 8  # 5 rounded up to the devices


def test_an_empty_split_counts_nothing_and_runs_no_step(case):
  """A split of 0 examples is allowed: no batch, no step, a count of 0 and NaN loss and
  accuracy (a mean over nothing), not a made-up 0."""
  calls = case.calls
  got = case.evaluate(0, 8)
  assert case.calls == calls
  assert got['count'] == 0
  assert np.isnan(got['loss']) and np.isnan(got['accuracy'])


def test_evaluate_run_on_a_split_without_examples_says_so(demo_run, monkeypatch):
  """`fineflax.evaluate` of a split left empty (every file unreadable, say) names the run
  and the split in one line, instead of failing inside the metrics."""
  load = data.load_dataset

  def emptied(data_config, keys=data.SPLIT_KEYS):
    dataset = load(data_config, keys)
    return data.Dataset(
        dataset.info,
        {
            name: data.Split(split.images[:0], split.labels[:0])
            for name, split in dataset.splits.items()
        },
    )

  monkeypatch.setattr(data, 'load_dataset', emptied)
  with pytest.raises(
      DataError,
      match=r"^.*: split 'test' of config.data.source='digits' has " r'no example to evaluate$',
  ):
    evaluate_lib.evaluate_run(demo_run, split='test')
