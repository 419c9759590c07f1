"""Learning-rate schedules over a phase: `phases[i].schedule` and the keys it reads.

Schedules count *updates*, one per `accumulate` batches; accumulation runs on across
epoch ends (optax.MultiSteps keeps its partial sums), so a phase makes
`epochs * steps_per_epoch // accumulate` updates and epoch e starts in update
`e * steps_per_epoch // accumulate`.
"""

from __future__ import annotations

from typing import Any

import optax

from fineflax.config import registry

SCHEDULES = ('constant', 'cosine', 'warmup_cosine', 'step')

Phase = Any  # a phase ConfigDict (fineflax.config.phase) or a dict with the same keys


def update_at_epoch(phase: Phase, steps_per_epoch: int, epoch: float) -> int:
  """The update in which the phase's `epoch` (may be fractional) begins."""
  return int(epoch * steps_per_epoch) // phase['accumulate']


def build_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the update count.

  constant: `learning_rate`; cosine: from `learning_rate` to 0 over the phase's epochs;
  warmup_cosine: linear from 0 over `warmup_epochs`, then cosine to 0 at the phase's end;
  step: times `decay_factor` from each epoch in `decay_epochs` on.
  """
  lr = float(phase['learning_rate'])
  total = max(1, update_at_epoch(phase, steps_per_epoch, phase['epochs']))
  kind = phase['schedule']
  if kind == 'constant':
    return optax.constant_schedule(lr)
  if kind == 'cosine':
    return optax.cosine_decay_schedule(lr, decay_steps=total)
  if kind == 'warmup_cosine':
    warmup = min(update_at_epoch(phase, steps_per_epoch, phase['warmup_epochs']), total - 1)
    if warmup == 0:  # optax's warmup of 0 steps warns; it would be this cosine anyway
      return optax.cosine_decay_schedule(lr, decay_steps=total)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total)
  if kind == 'step':
    # Never at update 0: a decay epoch >= 1 that starts inside the first update (fewer
    # batches an epoch than `accumulate`) takes effect from the second.
    boundaries = {
        max(1, update_at_epoch(phase, steps_per_epoch, int(e))): float(phase['decay_factor'])
        for e in phase['decay_epochs']
    }
    return optax.piecewise_constant_schedule(lr, boundaries)
  raise ValueError(f'schedule={kind!r}: expected one of {SCHEDULES}')


def scaled(schedule: optax.Schedule, multiplier: float) -> optax.Schedule:
  """`schedule` times `multiplier` (at 1, `schedule` itself: no extra multiply)."""
  if multiplier == 1:
    return schedule
  return lambda count: multiplier * schedule(count)


registry.register_choices('phases.schedule', SCHEDULES)
