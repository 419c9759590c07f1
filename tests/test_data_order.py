"""Randomness that changes when it should: each epoch trains on another order of the
examples, every order is a function of (seed, phase, epoch), and a resumed run sees the
orders an uninterrupted one sees."""

import sys

import jax
import numpy as np
import pytest

from fineflax import data, train
from fineflax.distributed import preemption
from fineflax.train import loop
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs

DEVICES = jax.devices()[:2]


def _recorded_orders(monkeypatch) -> list[np.ndarray]:
  """The example order of every epoch the run trains (the indices of its batches)."""
  orders: list[np.ndarray] = []
  original = data.train_batches

  def compiling() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_name != '_compile_train_step':
      frame = frame.f_back
    return frame is not None

  def recording(split, global_batch, rng):
    batches = list(original(split, global_batch, rng))
    if not compiling():  # not the compile's sample batch
      orders.append(np.concatenate([b['index'][b['weight'] > 0] for b in batches]))
    return iter(batches)

  # The loop draws batches itself, or through the epoch plan of a split on the devices.
  monkeypatch.setattr(loop.data, 'train_batches', recording)
  monkeypatch.setattr(data.dataset, 'train_batches', recording)
  return orders


def test_each_epoch_reshuffles_and_a_resume_sees_the_same_orders(tmp_path, monkeypatch):
  cfg = helpers.two_phase_config()
  cfg.phases = cfg.phases[:1]  # 2 epochs of 3 batches (40 examples, batch 16)
  orders = _recorded_orders(monkeypatch)
  train.train_and_evaluate(cfg, tmp_path / 'whole', devices=DEVICES)
  whole = list(orders)
  assert len(whole) == 2
  for order in whole:  # each epoch sees every example once
    assert sorted(order.tolist()) == list(range(40))
  assert not np.array_equal(whole[0], whole[1])  # and in another order
  assert not np.array_equal(whole[0], np.arange(40))

  orders.clear()
  with monkeypatch.context() as patch:  # stopped after the first step of epoch 2
    patch.setattr(preemption.StopRequest, 'at', lambda self, step: step == 4)
    with pytest.raises(preemption.Preempted):
      train.train_and_evaluate(cfg, tmp_path / 'cut', devices=DEVICES)
  train.train_and_evaluate(cfg, tmp_path / 'cut', devices=DEVICES)
  # Epoch 1, epoch 2 until the stop, and epoch 2 again after the resume: the same orders.
  assert [o.tolist() for o in orders] == [o.tolist() for o in (whole[0], whole[1], whole[1])]
